"""INF-LLaVA assembled: high-resolution vision front end -> projector -> LLaMA (transformers).

Example::

    >>> import torch
    >>> from inf_llava import get_config, build_tokenizer, build_inf_llava
    >>> cfg = get_config("tiny")
    >>> tok = build_tokenizer(cfg)
    >>> model = build_inf_llava(cfg, tok)
    >>> enc = tok(["USER : <image> what is in the image ? ASSISTANT :"], return_tensors="pt")
    >>> images = torch.rand(1, 3, *cfg.image_size)                      # (M, C, H, W) in [0, 1]
    >>> out = model(enc.input_ids, enc.attention_mask, images)
    >>> out.logits.shape                                               # (B, L - 1 + T, vocab), T = 16
    torch.Size([1, 27, 40])

The LLaVA-style merge (:func:`merge_visual_tokens`) replaces every image placeholder of a padded
batch by that image's visual tokens; samples may hold several images (``images`` lists them in
reading order: sample 0's placeholders left to right, then sample 1's, ...). Labels of visual,
prompt and padding positions are ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configs import LLAMA3_8B_SHAPE, InfLlavaConfig

__all__ = [
    "MergedInputs",
    "InfLlavaOutput",
    "InfLlava",
    "merge_visual_tokens",
    "merge_visual_tokens_reference",
    "build_inf_llava",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


@dataclass
class MergedInputs:
    """LLM inputs after the merge: ``inputs_embeds (B, S, E)``, ``attention_mask (B, S)`` (1 = real),
    ``position_ids (B, S)`` (0.. over real positions), ``labels (B, S)`` or ``None``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None


@dataclass
class InfLlavaOutput:
    """``logits``: ``(B, S, V)`` without labels; with labels only the ``(n, V)`` rows scored.
    ``loss = loss_sum / num_label_tokens`` (sum of token cross-entropies over the label tokens)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None  # real (text + visual) positions the LLM processed


def _check_merge_inputs(
    text_embeds, input_ids, attention_mask, image_token_id, visual_tokens, visual_mask, labels
):
    fn = "merge_visual_tokens"
    if text_embeds.ndim != 3:
        raise ValueError(f"{fn}: text_embeds must be (B, L, E); got shape {tuple(text_embeds.shape)}.")
    B, L, E = text_embeds.shape
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != (B, L):
            raise ValueError(
                f"{fn}: {name} must be (B, L) = {(B, L)} like text_embeds; got {tuple(t.shape)}."
            )
    if visual_tokens.ndim != 3 or visual_tokens.shape[-1] != E:
        raise ValueError(
            f"{fn}: visual_tokens must be (M, T, E) with E = {E} (the LLM width); got {tuple(visual_tokens.shape)}. "
            "Project the vision tokens to the LLM width first."
        )
    if visual_mask is not None and tuple(visual_mask.shape) != tuple(visual_tokens.shape[:2]):
        raise ValueError(
            f"{fn}: visual_mask must be (M, T) = {tuple(visual_tokens.shape[:2])}; got {tuple(visual_mask.shape)}."
        )
    n_placeholders = int(((input_ids == image_token_id) & attention_mask.bool()).sum())
    if n_placeholders != visual_tokens.shape[0]:
        raise ValueError(
            f"{fn}: the batch holds {n_placeholders} image placeholder(s) (id {image_token_id}) but "
            f"{visual_tokens.shape[0]} image(s) were given; pass exactly one image per placeholder, in reading "
            "order (sample 0's placeholders left to right, then sample 1's, ...)."
        )


def merge_visual_tokens(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    visual_tokens: torch.Tensor,
    visual_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
) -> MergedInputs:
    """Replace each image placeholder by its image's visual tokens, in one scatter (no loop over samples).

    Example::

        >>> ids = torch.tensor([[5, 4, 6, 0], [5, 4, 6, 4]])          # 4 = <image>, 0 = pad
        >>> m = merge_visual_tokens(torch.randn(2, 4, 8), ids, (ids != 0).long(), 4, torch.randn(3, 2, 8))
        >>> m.inputs_embeds.shape, m.attention_mask.tolist()
        (torch.Size([2, 6, 8]), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])

    Args:
        text_embeds: ``(B, L, E)`` embeddings of ``input_ids`` (values at placeholders are ignored).
        input_ids: ``(B, L)``; placeholders equal ``image_token_id``.
        attention_mask: ``(B, L)``, 1 for real tokens; padding may be on either side and is dropped.
        visual_tokens: ``(M, T, E)``, image ``m`` fills the ``m``-th placeholder in reading order.
        visual_mask: ``(M, T)`` bool, which of the ``T`` tokens are real (ragged images), or ``None``.
        labels: ``(B, L)`` targets aligned with ``input_ids`` (``-100`` = ignored), or ``None``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation) padding of the output.

    Returns:
        :class:`MergedInputs` of length ``S`` = the longest merged sample; visual and padding
        positions carry label ``-100``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(
            f"merge_visual_tokens: padding_side must be 'left' or 'right'; got {padding_side!r}."
        )
    _check_merge_inputs(
        text_embeds, input_ids, attention_mask, image_token_id, visual_tokens, visual_mask, labels
    )
    B, L, E = text_embeds.shape
    M, T, _ = visual_tokens.shape
    device = text_embeds.device
    valid = attention_mask.bool()
    is_image = (input_ids == image_token_id) & valid
    tokens_per_image = (
        visual_mask.sum(1)
        if visual_mask is not None
        else torch.full((M,), T, dtype=torch.long, device=device)
    )
    # Output slots taken by each input position: 1 per real text token, tokens_per_image[m] per placeholder.
    width = valid.long().masked_scatter(is_image, tokens_per_image.long())
    lengths = width.sum(1)  # (B,)
    S = int(lengths.max()) if B else 0
    offset = (S - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    first_slot = (
        torch.arange(B, device=device)[:, None] * S + offset[:, None] + width.cumsum(1) - width
    )  # (B, L)

    is_text = valid & ~is_image
    text_dest = first_slot[is_text]
    img_slot = first_slot[is_image]  # (M,), reading order = row-major order of the (B, L) mask
    if visual_mask is None:
        vis_dest = (img_slot[:, None] + torch.arange(T, device=device)).reshape(-1)
        vis_src = visual_tokens.reshape(M * T, E)
    else:
        rank = visual_mask.long().cumsum(1) - 1
        vis_dest = (img_slot[:, None] + rank)[visual_mask]
        vis_src = visual_tokens[visual_mask]
    dest = torch.cat([text_dest, vis_dest])
    src = torch.cat([text_embeds[is_text], vis_src.to(text_embeds.dtype)])
    embeds = text_embeds.new_zeros(B * S, E).index_copy(0, dest, src).view(B, S, E)

    slots = torch.arange(S, device=device)
    mask = ((slots >= offset[:, None]) & (slots < (offset + lengths)[:, None])).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0) * mask  # 0 on padding
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((B * S,), IGNORE_INDEX)
        new_labels[text_dest] = labels[is_text]
        new_labels = new_labels.view(B, S)
    return MergedInputs(embeds, mask, position_ids, new_labels)


def merge_visual_tokens_reference(
    text_embeds,
    input_ids,
    attention_mask,
    image_token_id,
    visual_tokens,
    visual_mask=None,
    labels=None,
    padding_side="right",
) -> MergedInputs:
    """Plain per-sample loop version of :func:`merge_visual_tokens` (the reference it is tested against)."""
    B, L, E = text_embeds.shape
    rows_e, rows_l, m = [], [], 0
    for b in range(B):
        pieces, labs = [], []
        for pos in range(L):
            if not attention_mask[b, pos]:
                continue
            if input_ids[b, pos] == image_token_id:
                v = visual_tokens[m] if visual_mask is None else visual_tokens[m][visual_mask[m]]
                pieces.append(v.to(text_embeds.dtype))
                labs += [IGNORE_INDEX] * v.shape[0]
                m += 1
            else:
                pieces.append(text_embeds[b, pos][None])
                labs.append(int(labels[b, pos]) if labels is not None else IGNORE_INDEX)
        rows_e.append(torch.cat(pieces) if pieces else text_embeds.new_zeros(0, E))
        rows_l.append(labs)
    S = max(r.shape[0] for r in rows_e)
    embeds = text_embeds.new_zeros(B, S, E)
    mask = torch.zeros(B, S, dtype=torch.long)
    pos_ids = torch.zeros(B, S, dtype=torch.long)
    new_labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    for b, (e, lab) in enumerate(zip(rows_e, rows_l)):
        n = e.shape[0]
        sl = slice(S - n, S) if padding_side == "left" else slice(0, n)
        embeds[b, sl] = e
        mask[b, sl] = 1
        pos_ids[b, sl] = torch.arange(n)
        new_labels[b, sl] = torch.tensor(lab, dtype=torch.long)
    return MergedInputs(embeds, mask, pos_ids, new_labels if labels is not None else None)


class InfLlava(nn.Module):
    """Vision front end (DCM + ViT + DEM + thumbnail) -> projector -> ``LlamaForCausalLM``.

    Example::

        >>> model = build_inf_llava(cfg, tok)                 # cfg, tok: see the module docstring
        >>> model.set_stage(1)[:1]                             # stage 1: DEM + projector train
        ['vision.dem.attention.linears.0.weight']
        >>> ids, mask = encode_prompts(tok, cfg, ["what is in the image ?"])      # inf_llava.data
        >>> model.generate(ids, mask, torch.rand(1, 3, 96, 96), max_new_tokens=4).shape
        torch.Size([1, 4])

    Shapes: ``input_ids``/``attention_mask``/``labels`` ``(B, L)``; ``images`` ``(M, C, H, W)`` in
    ``[0, 1]`` (or a list of ``(C, H_m, W_m)``), one per image placeholder, in reading order.

    Parts (what the training stages freeze): ``vision.backbone`` (the ViT, always frozen),
    the rest of ``vision`` (the DEM), ``projector``, ``llm``.
    """

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = int(image_token_id)

    # ---- parts and stages -------------------------------------------------------------------------------------
    @property
    def vision_backbone(self) -> nn.Module:
        return self.vision.backbone

    def set_stage(self, stage: int) -> list[str]:
        """Freeze for training stage 1 (DEM + projector train) or 2 (DEM + projector + LLM train).

        The ViT is frozen in both (Sec. 5.2). Returns the names of the trainable parameters.
        """
        if stage not in (1, 2):
            raise ValueError(
                f"InfLlava.set_stage: stage must be 1 (pretraining) or 2 (fine-tuning); got {stage!r}."
            )
        self.requires_grad_(False)
        self.vision.requires_grad_(True)
        self.vision_backbone.requires_grad_(False)
        self.projector.requires_grad_(True)
        if stage == 2:
            self.llm.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ---- forward ----------------------------------------------------------------------------------------------
    def encode_images(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(M, C, H, W)`` images in ``[0, 1]`` (or a list of ``(C, H_m, W_m)``, any sizes) -> ``(M, T, E)``
        LLM-width visual tokens and an ``(M, T)`` bool mask of real tokens (``None``: all real)."""
        width = self.llm.get_input_embeddings().embedding_dim
        if images is None or len(images) == 0:
            return self.llm.get_input_embeddings().weight.new_zeros(0, 1, width), None
        out = self.vision(images)
        tokens = out.tokens if hasattr(out, "tokens") else out
        token_mask = getattr(out, "token_mask", None)
        return self.projector(tokens), token_mask

    def prepare_inputs(
        self, input_ids, attention_mask, images, labels=None, padding_side="right"
    ) -> MergedInputs:
        """Embed the text, encode the images and merge them (see :func:`merge_visual_tokens`)."""
        embed = self.llm.get_input_embeddings()
        # Placeholders (possibly LLaVA's -200) and padding are never looked up.
        placeholder = (input_ids == self.image_token_id) | ~attention_mask.bool()
        text_embeds = embed(input_ids.masked_fill(placeholder, 0))
        visual, visual_mask = self.encode_images(images)
        return merge_visual_tokens(
            text_embeds,
            input_ids,
            attention_mask,
            self.image_token_id,
            visual,
            visual_mask,
            labels,
            padding_side,
        )

    def forward(self, input_ids, attention_mask, images=None, labels=None) -> InfLlavaOutput:
        """Causal-LM forward. With ``labels``, only positions with a target are projected to the vocabulary."""
        merged = self.prepare_inputs(input_ids, attention_mask, images, labels)
        hidden = self.llm.model(
            inputs_embeds=merged.inputs_embeds,
            attention_mask=merged.attention_mask,
            position_ids=merged.position_ids,
            use_cache=False,
        ).last_hidden_state
        head = self.llm.get_output_embeddings()
        if labels is None:
            return InfLlavaOutput(logits=head(hidden), num_tokens=merged.attention_mask.sum())
        targets = merged.labels[:, 1:]
        scored = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][scored])
        loss_sum = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        n = scored.sum()
        return InfLlavaOutput(
            logits=logits,
            loss=loss_sum / n.clamp(min=1),
            loss_sum=loss_sum,
            num_label_tokens=n,
            num_tokens=merged.attention_mask.sum(),
        )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, images=None, **generate_kwargs) -> torch.Tensor:
        """Greedy/sampled decoding with the KV cache: returns the new token ids ``(B, n_new)``.

        The prompt is merged left-padded and passed as ``inputs_embeds``; transformers then keeps the
        cache and feeds one token per step. ``generate_kwargs`` go to ``LlamaForCausalLM.generate``.
        """
        merged = self.prepare_inputs(input_ids, attention_mask, images, padding_side="left")
        return self.llm.generate(
            inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, **generate_kwargs
        )


# ---- building ---------------------------------------------------------------------------------------------------
def _build_llm(cfg: InfLlavaConfig, tokenizer, dtype=None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.llm["kind"] == "random":
        kwargs = {k: v for k, v in cfg.llm.items() if k != "kind"}
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
        return LlamaForCausalLM(config).to(dtype or torch.float32)
    llm = LlamaForCausalLM.from_pretrained(
        cfg.llm["path"], dtype=dtype or torch.float32, local_files_only=True
    )
    if cfg.name == "llama3-8b":
        c = llm.config
        rope_theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get(
            "rope_theta"
        )
        got = {k: (rope_theta if k == "rope_theta" else getattr(c, k, None)) for k in LLAMA3_8B_SHAPE}
        bad = {k: (got[k], v) for k, v in LLAMA3_8B_SHAPE.items() if got[k] != v}
        if bad:
            raise ValueError(
                f"build_inf_llava: {cfg.llm['path']} is not LLaMA-3-8B shaped; (got, expected): {bad}. "
                "Point --llm-dir at a LLaMA-3-8B(-Instruct) transformers checkpoint."
            )
    return llm


def build_inf_llava(cfg: InfLlavaConfig, tokenizer, *, llm_dtype: torch.dtype | None = None) -> InfLlava:
    """Build the model of ``cfg``.

    The LLM's weights are ``llm_dtype`` (default float32: trainable master weights; bfloat16 halves the
    memory of a frozen or inference-only LLM). Random parts are drawn from ``cfg.seed``, so rebuilding
    gives the same frozen weights (checkpoints then only need the trained parts). Released INF-LLaVA
    DEM/projector weights (``cfg.inf_llava_weights``: ``spatial_embed.*``, ``mm_projector.*``) are loaded
    through ``hrperc.pretrained.inf_llava.load_dem`` and ``load_projector``.
    """
    from hrperc.modules.projector import build_projector
    from hrperc.pretrained.inf_llava import load_projector

    from ._vision import build_vision

    released = cfg.inf_llava_weights or None  # a file or a directory of shards; each loader reads its keys
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vision, vision_dim = build_vision(cfg, released)
        llm = _build_llm(cfg, tokenizer, llm_dtype)
        if released is not None:
            projector = load_projector(released)
        else:
            projector = build_projector("mlp2x_gelu", vision_dim, llm.config.hidden_size)
    return InfLlava(vision, projector, llm, cfg.image_token_id(tokenizer))
