"""Learnable class prompts passed through CLIP's frozen text transformer.

``encode_prompted_text`` re-expresses open_clip's ``CLIP.encode_text`` with the token embeddings given instead of
looked up, built on the model's own modules (token_embedding, positional_embedding, transformer, ln_final,
text_projection, attn_mask, EOT pooling) — no copy of open_clip.
"""

from __future__ import annotations

import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

__all__ = ["LearnablePrompts", "encode_prompted_text", "PLACEHOLDER"]

PLACEHOLDER = "{}"


def _text_tower(model: nn.Module) -> nn.Module:
    if hasattr(model, "token_embedding"):
        return model
    raise NotImplementedError(
        f"learnable prompts need an open_clip CLIP with its text tower inline (token_embedding, "
        f"positional_embedding, transformer, ln_final, text_projection); got {type(model).__name__}")


def encode_prompted_text(model: nn.Module, token_ids: Tensor, embeddings: Tensor) -> Tensor:
    """Text features [N, D] of token sequences ``token_ids`` [N, L] whose input embeddings are ``embeddings``
    [N, L, W] (the EOT position is taken from ``token_ids`` as in ``CLIP.encode_text``)."""
    tower = _text_tower(model)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + tower.positional_embedding.to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask)
    x = tower.ln_final(x)
    x = text_global_pool(x, token_ids, tower.text_pool_type, eos_token_id=getattr(tower, "text_eos_id", None))
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x


def _content_tokens(tokenizer, text: str) -> Tensor:
    """The token ids of ``text`` without the start/end-of-text tokens and padding."""
    ids = tokenizer([text])[0]
    return ids[ids != 0][1:-1].long()


class LearnablePrompts(nn.Module):
    """``num_prompts`` prompts of ``length`` learnable token embeddings each, inserted into ``template``.

    The template's ``{}`` becomes ``length`` placeholder tokens whose embeddings are replaced by the learnable
    vectors. The vectors start as the embeddings of random real vocabulary tokens drawn with ``seed`` — from
    the whole vocabulary (the authors' choice), or from the tokens of ``init_words`` when given (a CLIP trained on
    a small vocabulary: the toy CLIP knows 34 tokens and its other rows are zero, so the authors' draw starts
    every prompt from the same all-zero vectors; the Sinkhorn assignment still spreads them over the clusters).
    ``forward(clip_model)`` returns the prototypes [num_prompts, D] (not normalised).
    """

    token_ids: Tensor
    positions: Tensor

    def __init__(self, clip_model: nn.Module, tokenizer, num_prompts: int = 64, length: int = 4,
                 template: str = "A photo of a {} in the scene", seed: int = 0, init_words: list[str] | None = None):
        """The prompts' tokens and their initial embeddings.

        Args:
            clip_model: the open_clip CLIP whose text tower embeds the prompts.
            tokenizer: its tokenizer.
            num_prompts: how many prompts.
            length: learnable token embeddings per prompt.
            template: the text the tokens are inserted into (at ``{}``).
            seed: seed of the initial token draw.
            init_words: draw the initial tokens from these words' tokens (None: the whole vocabulary).
        """
        super().__init__()
        if template.count(PLACEHOLDER) != 1:
            raise ValueError(f"the prompt template needs exactly one '{{}}', got {template!r}")
        if num_prompts < 1 or length < 1:
            raise ValueError("num_prompts and length must be positive")
        tower = _text_tower(clip_model)
        token_ids = tokenizer([template.format(" ".join([PLACEHOLDER] * length))])[0]
        placeholder = _content_tokens(tokenizer, PLACEHOLDER)
        if placeholder.numel() != 1:
            raise ValueError("the tokenizer does not encode '{}' as a single token")
        positions = (token_ids == placeholder[0]).nonzero().flatten()
        if positions.numel() != length:
            raise ValueError(f"expected {length} placeholder tokens in the tokenized template, found "
                             f"{positions.numel()} (template too long for the context?)")
        generator = torch.Generator().manual_seed(seed)
        if init_words:
            tokens = [_content_tokens(tokenizer, w) for w in init_words]
            empty = [w for w, t in zip(init_words, tokens) if not t.numel()]
            if empty:
                raise ValueError(f"prompt_init_words: {empty} have no tokens")
            pool = torch.unique(torch.cat(tokens))
            words = pool[torch.randint(len(pool), (num_prompts, length), generator=generator)]
        else:
            # the last few ids are special tokens (start/end of text), as in the authors' code
            words = torch.randint(tower.token_embedding.num_embeddings - 10, (num_prompts, length), generator=generator)
        with torch.no_grad():
            init = tower.token_embedding(words.to(tower.token_embedding.weight.device)).float()
        self.num_prompts, self.length = num_prompts, length
        self.tokens = nn.Parameter(init.clone())
        self.register_buffer("token_ids", token_ids.long(), persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        self.register_buffer("init_words", words, persistent=False)

    def forward(self, clip_model: nn.Module) -> Tensor:
        tower = _text_tower(clip_model)
        ids = self.token_ids.unsqueeze(0).expand(self.num_prompts, -1)
        embeddings = tower.token_embedding(ids).clone()
        embeddings[:, self.positions] = self.tokens.to(embeddings.dtype)
        return encode_prompted_text(clip_model, ids, embeddings)
