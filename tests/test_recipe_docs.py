"""docs/recipes.md's "Writing a recipe" example runs as written and gives a working recipe."""

import re
from pathlib import Path

import torch

import hrperc
from hrperc import recipes
from hrperc.ops import preprocess

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def test_writing_a_recipe_example_runs():
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "class Thumbnail" in b)
    try:
        exec(compile(block, str(DOC), "exec"), {})
        assert "thumbnail" in hrperc.list_recipes()
        vit = hrperc.create_backbone("timm:vit_tiny_patch16_224")
        enc = hrperc.create_encoder("thumbnail", vit)
        image = torch.randint(0, 256, (3, 90, 40), dtype=torch.uint8)
        out = enc([torch.rand(3, 300, 500), image])
        assert out.num_tokens == [enc.num_tokens((300, 500)), enc.num_tokens((90, 40))] == [196, 196]
        # its one view is the image resized to the tile: the tokens are the backbone's features of it
        view = preprocess.to_unit(preprocess.resize(image[None], (224, 224)))
        with torch.no_grad():
            ref = vit.features(vit.normalize(view), layer=-2)
        torch.testing.assert_close(out.tokens[1:], ref, atol=1e-5, rtol=0)
    finally:
        recipes._RECIPES.pop("thumbnail", None)
