"""A tiny Llama-architecture model and the CPU fine-tuning loop that makes it memorise the authors.

Sizes from CPU-NOTES.md: hidden 128, 2 layers, 4 heads, MLP 512, tied embeddings is 0.81 M
parameters with a ~2 k vocabulary, about 60 ms per batch of 32 on two threads, and memorises
the facts (answer NLL < 0.1 per token) in ~14 epochs at lr 1e-3.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from pum.common.qa import QAPair, collate, sequence_nll

log = logging.getLogger(__name__)

MEMORISED_NLL = 0.1  # mean answer NLL per token below which the facts are memorised (CPU-NOTES.md)


def tiny_llama_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4,
                      intermediate: int = 512, tie: bool = True, *, bos_token_id: int | None = None,
                      eos_token_id: int | None = None, pad_token_id: int | None = None,
                      max_positions: int = 512) -> LlamaConfig:
    """A real `LlamaConfig` (RoPE, SwiGLU, RMSNorm), full multi-head attention, no dropout."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}): each head gets hidden/heads dimensions")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, tie_word_embeddings=tie,
        max_position_embeddings=max_positions, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def config_for(tokenizer, **sizes) -> LlamaConfig:
    """`tiny_llama_config` sized to a tokenizer's vocabulary, with its special token ids."""
    return tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the initialisation depends on `seed` only (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def finetune(model, tokenizer, pairs: list[QAPair], epochs: int, lr: float = 1e-3, batch_size: int = 32,
             seed: int = 0, progress: bool = True, target_nll: float | None = MEMORISED_NLL,
             weight_decay: float = 0.0) -> dict:
    """Fine-tune `model` in place on the answers of `pairs` (AdamW, shuffled batches, answer-only loss).

    Stops after the first epoch whose mean answer NLL per token is below `target_nll` (None: run
    every epoch). The epoch's NLL is averaged over its batches while training, so it slightly
    overstates the final model's NLL. Returns {"epochs", "nll", "history", "seconds", "converged", "steps"}.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1 (got {epochs})")
    if not pairs:
        raise ValueError("finetune needs at least one question–answer pair")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    steps = 0
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(1, epochs + 1), desc="fine-tune", unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        total_nll, total_tokens = 0.0, 0
        for first in range(0, len(order), batch_size):
            batch = collate(tokenizer, [pairs[i] for i in order[first : first + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, counts = sequence_nll(logits, batch["labels"])
            tokens = int(counts.sum())
            loss = nll.sum() / max(tokens, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            total_nll += float(nll.sum().detach())
            total_tokens += tokens
        epoch_nll = total_nll / max(total_tokens, 1)
        history.append(epoch_nll)
        log.info("fine-tune epoch %d/%d: answer NLL %.4f per token (P̄ ≈ %.3f), %.1f s",
                 epoch, epochs, epoch_nll, math.exp(-epoch_nll), time.perf_counter() - start)
        bar.set_postfix(nll=f"{epoch_nll:.3f}")
        if target_nll is not None and epoch_nll < target_nll:
            break
    bar.close()
    model.eval()
    converged = target_nll is not None and history[-1] < target_nll
    if target_nll is not None and not converged:
        log.warning("fine-tune stopped after %d epochs at answer NLL %.3f, above the target %.3f: "
                    "raise epochs or lr to memorise the facts", len(history), history[-1], target_nll)
    return {"epochs": len(history), "nll": history[-1], "history": history,
            "seconds": time.perf_counter() - start, "converged": converged, "steps": steps}
