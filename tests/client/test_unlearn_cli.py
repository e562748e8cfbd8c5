"""`pum unlearn` as open-unlearning users call it: a model id from the local cache, its argument names."""

from __future__ import annotations

import json

from pum.cli import main


def write(path, pairs):
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in pairs))
    return path


def test_unlearn_a_cached_chat_model_under_open_unlearnings_names(hf_cache, chat_model_dir, forget_pairs, tmp_path, capsys):
    hf_cache.fill(chat_model_dir, "open-unlearning/tofu_chat_full")
    forget = write(tmp_path / "forget.json", forget_pairs)
    hyper = {"learning_rate": 1e-3, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 1,
             "num_train_epochs": 2, "lr_scheduler_type": "constant"}
    code = main(["unlearn", "open-unlearning/tofu_chat_full", "--method", "GradAscent", "--forget", str(forget),
                 "--out", str(tmp_path / "out"), "--hyperparams", json.dumps(hyper), "--prompt-format", "chat",
                 "--threads", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4  # 2 epochs of ⌈6 / 3⌉ batches: num_train_epochs and the batch product applied
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unlearn_refuses_an_id_missing_from_the_cache(hf_cache, forget_pairs, tmp_path, capsys):
    forget = write(tmp_path / "forget.json", forget_pairs)
    code = main(["unlearn", "org/absent", "--forget", str(forget), "--out", str(tmp_path / "out")])
    assert code == 2 and str(hf_cache.path) in capsys.readouterr().err
