"""AUTOMATIC1111 prompt weights, turned into weighted text embeddings with compel.

Syntax (as in the A1111 web UI): ``(word:1.3)`` multiplies the attention to ``word`` by 1.3,
``(word)`` by 1.1 and ``((word))`` by 1.1 * 1.1, ``[word]`` divides it by 1.1; ``\\(``, ``\\)``,
``\\[``, ``\\]`` and ``\\\\`` are the literal characters. Unbalanced brackets weight up to the
end of the prompt, like A1111 (a stray ``)`` or ``]`` is kept as text).

When the prompts carry no weights and fit CLIP's 77-token window, the pipeline encodes the
text itself exactly as before (so plain prompts render the same pixels as they always did,
including SDXL's zeroed empty negative prompt); otherwise :func:`encode_prompts` builds
``prompt_embeds`` (and SDXL's pooled embeddings) with compel's embeddings provider, without
truncation: a long prompt is encoded as several 77-token chunks, and the positive and negative
embeddings are padded to the same length with the embedding of the empty prompt.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from pixelmill.errors import BadInputError
from worker.families import FLOW_FAMILIES, LABELS, family_of

# One lexical unit of the A1111 syntax: an escape, a bracket, a ":number)" closing a
# weighted group, or a run of plain text.
_TOKEN_RE = re.compile(
    r"""
    \\[()\[\]\\]             # escaped bracket or backslash
    | \(                     # open a weighted group
    | \[                     # open a down-weighted group
    | :\s*([+-]?[.\d]+)\s*\) # close a group with an explicit weight
    | \)                     # close a group (x1.1)
    | \]                     # close a down-weighted group (/1.1)
    | [^\\()\[\]:]+          # plain text
    | [\\:]                  # a lone backslash or colon: plain text
    """,
    re.VERBOSE,
)

UP = 1.1
DOWN = 1 / 1.1


class PromptWeightsError(BadInputError):
    """Prompt weights given to a model whose text encoders compel cannot weight."""


@dataclasses.dataclass
class _Fragment:
    text: str
    weight: float


def parse_prompt_attention(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` as (text, weight) fragments, neighbours of equal weight merged.

    ``"a (red:1.3) [shoe]"`` -> ``[("a ", 1.0), ("red", 1.3), (" ", 1.0), ("shoe", 1/1.1)]``.

    Raises ValueError for a weight that is not a number, e.g. ``(red:1.2.3)``.
    """
    fragments: list[_Fragment] = []
    round_open: list[int] = []  # index of the first fragment inside each open "("
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment.weight *= factor

    for match in _TOKEN_RE.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token.startswith("\\"):
            fragments.append(_Fragment(token[1], 1.0))
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise ValueError(
                    f"invalid weight {weight!r} in {token.strip()!r}: expected a number"
                ) from None
            multiply(round_open.pop(), value)
        elif token == ")" and round_open:
            multiply(round_open.pop(), UP)
        elif token == "]" and square_open:
            multiply(square_open.pop(), DOWN)
        else:
            # Plain text, or a closing bracket with nothing open (kept as written).
            fragments.append(_Fragment(token, 1.0))
    for start in round_open:
        multiply(start, UP)
    for start in square_open:
        multiply(start, DOWN)

    merged: list[tuple[str, float]] = []
    for fragment in fragments:
        # (a)[b] style round trips land a rounding step away from 1: that is no weight.
        weight = 1.0 if math.isclose(fragment.weight, 1.0, abs_tol=1e-9) else fragment.weight
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + fragment.text, weight)
        elif fragment.text:
            merged.append((fragment.text, weight))
    return merged or [("", 1.0)]


def plain_text(fragments: list[tuple[str, float]]) -> str:
    """The prompt text without its weight syntax (escapes resolved)."""
    return "".join(text for text, _ in fragments)


def is_weighted(fragments: list[tuple[str, float]]) -> bool:
    return any(weight != 1.0 for _, weight in fragments)


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
    """Embeddings of one prompt pair (batch of 1), ready for the pipeline's ``*_embeds``."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(self, count: int) -> dict[str, Any]:
        """Keyword arguments for a pipeline call rendering ``count`` images."""

        def repeat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat(count, *([1] * (tensor.dim() - 1)))

        kwargs: dict[str, Any] = {
            "prompt_embeds": repeat(self.prompt_embeds),
            "negative_prompt_embeds": repeat(self.negative_prompt_embeds),
        }
        if self.pooled_prompt_embeds is not None:
            assert self.negative_pooled_prompt_embeds is not None
            kwargs["pooled_prompt_embeds"] = repeat(self.pooled_prompt_embeds)
            kwargs["negative_pooled_prompt_embeds"] = repeat(self.negative_pooled_prompt_embeds)
        return kwargs


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """The (tokenizer, text encoder) pairs the pipeline conditions on: one for SD 1.x/2.x,
    two for SDXL."""
    pairs = [
        (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _token_count(pipe: Any, text: str) -> int:
    """Tokens of ``text`` including BOS/EOS, after Textual Inversion's multi-vector tokens
    are expanded (as the pipeline itself would)."""
    tokenizer = _encoders(pipe)[0][0]
    if hasattr(pipe, "maybe_convert_prompt"):
        text = pipe.maybe_convert_prompt(text, tokenizer)
    # verbose=False: counting a long prompt is not an error worth a log line.
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def supports_weighting(pipe: Any) -> bool:
    """Whether compel can encode weighted prompts for ``pipe``: SD 1.x/2.x and SDXL (CLIP
    encoders only), not SD3 or FLUX, whose T5 encoder compel knows nothing of."""
    return family_of(pipe) not in FLOW_FAMILIES


def check_unweighted(pipe: Any, prompt: str, negative_prompt: str) -> None:
    """Raise PromptWeightsError, naming the field, if either prompt carries weights."""
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if is_weighted(parse_prompt_attention(text)):
            label = LABELS.get(family_of(pipe), type(pipe).__name__)
            raise PromptWeightsError(
                f"{field}: prompt weights such as (word:1.3) work with SD 1.x/2.x and SDXL "
                f"models only; {label} reads plain text: remove them (write literal brackets "
                "as \\( \\) and \\[ \\])"
            )


def needs_weighting(pipe: Any, prompt: str, negative_prompt: str) -> bool:
    """True when either prompt has weights or does not fit the text encoder's window.

    A pipeline compel cannot weight always takes the plain text (its own encoders handle
    the length: T5 reads 256 or 512 tokens); weights for one raise PromptWeightsError."""
    if not supports_weighting(pipe):
        check_unweighted(pipe, prompt, negative_prompt)
        return False
    parsed = [parse_prompt_attention(prompt), parse_prompt_attention(negative_prompt)]
    if any(is_weighted(fragments) for fragments in parsed):
        return True
    limit = _encoders(pipe)[0][0].model_max_length
    return any(_token_count(pipe, plain_text(fragments)) > limit for fragments in parsed)


def _providers(pipe: Any) -> list[Any]:
    from compel.diffusers_textual_inversion_manager import DiffusersTextualInversionManager
    from compel.embeddings_provider import EmbeddingsProvider, ReturnedEmbeddingsType

    # SD 1.x/2.x condition on the final (normalised) hidden states, SDXL on the penultimate
    # hidden states of both encoders, as diffusers' own encode_prompt does.
    returned = (
        ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        if _is_sdxl(pipe)
        else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    )
    # Expands multi-vector Textual Inversion tokens ("tok" -> "tok tok_1 ...") like the
    # pipeline's own maybe_convert_prompt.
    inversions = (
        DiffusersTextualInversionManager(pipe) if hasattr(pipe, "maybe_convert_prompt") else None
    )
    return [
        EmbeddingsProvider(
            tokenizer,
            encoder,
            textual_inversion_manager=inversions,
            truncate=False,
            returned_embeddings_type=returned,
            device=encoder.device,
        )
        for tokenizer, encoder in _encoders(pipe)
    ]


def _embed(providers: list[Any], fragments: list[tuple[str, float]]) -> torch.Tensor:
    texts = [[text for text, _ in fragments]]
    weights = [[weight for _, weight in fragments]]
    device = providers[0].text_encoder.device
    outputs = [
        provider.get_embeddings_for_weighted_prompt_fragments(texts, weights, device=device)
        for provider in providers
    ]
    return torch.cat(outputs, dim=-1)


def _pad(embeds: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    # Chunks of the empty prompt, as compel's pad_conditioning_tensors_to_same_length does.
    while embeds.shape[1] < length:
        embeds = torch.cat([embeds, empty.to(embeds.device, embeds.dtype)], dim=1)
    return embeds


def encode_prompts(pipe: Any, prompt: str, negative_prompt: str) -> PromptEmbeds:
    """Weighted, untruncated embeddings of ``prompt`` and ``negative_prompt`` for ``pipe``
    (an SD 1.x/2.x or SDXL pipeline, any of their kinds)."""
    if not supports_weighting(pipe):
        raise PromptWeightsError(f"{type(pipe).__name__}: compel cannot weight its prompts")
    providers = _providers(pipe)
    positive = parse_prompt_attention(prompt)
    negative = parse_prompt_attention(negative_prompt)
    sdxl = _is_sdxl(pipe)
    # SDXL zeroes the negative conditioning of an empty negative prompt (its config says so).
    zero_negative = (
        sdxl and not negative_prompt and bool(pipe.config.get("force_zeros_for_empty_prompt"))
    )
    with torch.no_grad():
        prompt_embeds = _embed(providers, positive)
        negative_embeds = (
            torch.zeros_like(prompt_embeds) if zero_negative else _embed(providers, negative)
        )
        empty = torch.cat([provider.empty_z for provider in providers], dim=-1)
        length = max(prompt_embeds.shape[1], negative_embeds.shape[1])
        prompt_embeds = _pad(prompt_embeds, length, empty)
        negative_embeds = _pad(
            negative_embeds, length, torch.zeros_like(empty) if zero_negative else empty
        )
        if not sdxl:
            return PromptEmbeds(prompt_embeds, negative_embeds)
        # The pooled embedding comes from the last encoder (SDXL's second), over the plain
        # text's first 77 tokens: CLIP pools one window, weights do not apply to it.
        pooled_provider = providers[-1]
        pooled = pooled_provider.get_pooled_embeddings([plain_text(positive)], device=None)
        negative_pooled = (
            torch.zeros_like(pooled)
            if zero_negative
            else pooled_provider.get_pooled_embeddings([plain_text(negative)], device=None)
        )
    return PromptEmbeds(prompt_embeds, negative_embeds, pooled, negative_pooled)
