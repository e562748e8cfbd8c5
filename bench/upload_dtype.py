"""What each upload form loses of a float32-trained update (the numerical trap of issue 13 item 1).

A small bf16 Llama (weights ~N(0, 0.02)) is loaded in float32, as workers do, trained a few AdamW
steps at lr 1e-5 on random tokens, and its update Δ = trained − received is sent three ways:
(a) Δ in float32 (`kind=delta`, the reference), (b) the trained weights rounded to bf16
(`kind=trained`, the server subtracts the copy), (c) Δ rounded to bf16. Prints the relative L2
error of the update each form delivers, ‖Δ_form − Δ‖ / ‖Δ‖, and the bytes each uploads.

    .venv/bin/python bench/upload_dtype.py [--steps 5] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import json

import torch


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum((got[n].double() - want[n].double()).pow(2).sum().item() for n in want)
    den = sum(want[n].double().pow(2).sum().item() for n in want)
    return (num / den) ** 0.5


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=256, tie_word_embeddings=False)
    received = {n: t.to(torch.bfloat16) for n, t in LlamaForCausalLM(config).state_dict().items()}  # a bf16 copy
    model = LlamaForCausalLM(config)
    model.load_state_dict({n: t.float() for n, t in received.items()})  # workers train in float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    for _ in range(args.steps):
        tokens = torch.randint(0, config.vocab_size, (4, 32))
        loss = -model(input_ids=tokens, labels=tokens).loss  # gradient ascent, as unlearning does
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {n: t.detach() for n, t in model.state_dict().items()}
    delta = {n: trained[n] - received[n].float() for n in received}
    forms = {
        "float32 delta": (delta, 4),
        "bf16 trained weights": ({n: trained[n].to(torch.bfloat16).float() - received[n].float() for n in received}, 2),
        "bf16 delta": ({n: delta[n].to(torch.bfloat16).float() for n in received}, 2),
    }
    numel = sum(t.numel() for t in received.values())
    results = {name: {"relative_error": relative_error(value, delta), "upload_bytes": numel * width}
               for name, (value, width) in forms.items()}
    print(f"{'upload form':<22} {'rel. error of Δ':>16} {'bytes':>12}")
    for name, row in results.items():
        print(f"{name:<22} {row['relative_error']:>16.3e} {row['upload_bytes']:>12,}")
    print(json.dumps({"steps": args.steps, "lr": args.lr, "parameters": numel, "forms": results}))


if __name__ == "__main__":
    main()
