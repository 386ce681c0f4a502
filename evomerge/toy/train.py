"""Tiny Llama models for the toy world and the loop that trains them.

The models are ordinary ``LlamaForCausalLM`` so transformers, lm-eval and mergekit treat them
like any Llama checkpoint. Embeddings are untied: a merge then has a real ``lm_head`` to get
right, as with most open LLMs. Training is plain AdamW with a cosine schedule on CPU; with a fixed
seed and thread count it is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import torch

from .skills import Example

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@dataclass(frozen=True)
class TrainSettings:
    """One training phase. ``answer_only`` trains on the target alone (the fine-tunes), which
    reaches the skill in fewer, smaller steps and so keeps the specialist close to the base."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    answer_only: bool = False


def new_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (about 0.7M parameters), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def encode_batch(tokenizer: PreTrainedTokenizerFast, batch: list[Example], answer_only: bool) -> dict[str, torch.Tensor]:
    """Token ids for ``BOS context target EOS``, right-padded, with labels masked where no loss goes."""
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for context, target in batch:
        ctx = tokenizer(context)["input_ids"]  # BOS + context
        tgt = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        rows.append(ctx + tgt)
        labels.append(([-100] * len(ctx) if answer_only else [-100] + ctx[1:]) + tgt)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    stream: Iterator[Example],
    settings: TrainSettings,
    *,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Trains ``model`` in place on ``settings.steps`` batches from ``stream``; returns the last loss.

    ``on_step(step, loss)`` is called after every step (progress reports, tuning experiments).
    """
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    loss_value = float("nan")
    for step in range(settings.steps):
        batch = encode_batch(tokenizer, list(islice(stream, settings.batch_size)), settings.answer_only)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    return loss_value
