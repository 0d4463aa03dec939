"""Builders of small real artefacts for tests: tiny OLMoE checkpoints and a real HF Trainer run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from analysis.models import build_word_tokenizer, tiny_moe_config

# The tiny vocabulary: numbers 0..19 and the two symbols of "a + b = c" sums.
WORDS = [str(i) for i in range(20)] + ["+", "="]


def tiny_tokenizer():
    """The word-level tokenizer over WORDS (BOS added to every encoding)."""
    return build_word_tokenizer(WORDS)


def tiny_model_and_tokenizer(seed: int = 0):
    """A freshly initialised tiny OLMoE (hidden 32, 2 layers, 4 experts) and its tokenizer."""
    from transformers import OlmoeForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_moe_config(len(tokenizer), hidden_size=32, num_layers=2, num_experts=4)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config)
    model.eval()
    return model, tokenizer


def save_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny OLMoE and its tokenizer with save_pretrained (safetensors) into ``folder``."""
    folder = Path(folder)
    model, tokenizer = tiny_model_and_tokenizer(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sum_texts(count: int = 8) -> list[str]:
    """Short sums like "3 + 4 = 7", all the same number of tokens."""
    return [f"{a} + {a % 5} = {a + a % 5}" for a in range(count)]


def make_trainer_output(root: str | Path, steps: Sequence[int] = (2, 4, 6), seed: int = 0) -> Path:
    """Train a tiny OLMoE with a real ``transformers.Trainer`` and save checkpoints at ``steps``.

    Leaves ``root/checkpoint-N/`` folders (model, tokenizer, trainer_state.json) for each N in
    ``steps``, logging loss, grad norm, learning rate and tokens seen at every step. Returns root.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments

    root = Path(root)
    wanted = sorted(set(steps))
    if not wanted or wanted[0] < 1:
        raise ValueError("make_trainer_output: steps must be positive integers")

    class SaveAtSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step in wanted
            return control

    model, tokenizer = tiny_model_and_tokenizer(seed)
    model.train()
    data = []
    for text in sum_texts(8):
        ids = torch.tensor(tokenizer(text)["input_ids"])
        data.append({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=wanted[-1],
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_only_model=True,
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[SaveAtSteps()])
    trainer.train()
    return root
