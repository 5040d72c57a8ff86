"""The README's usage example runs as written (keeps the front page true)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    usage = text[text.index("## Usage") :]
    blocks = re.findall(r"```python\n(.*?)```", usage, flags=re.S)
    assert blocks, "README has no python block under '## Usage'"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # the asserts inside the example must hold
    assert namespace["out"].tokens.shape == (2, namespace["enc"].num_tokens((600, 800)), 192)
