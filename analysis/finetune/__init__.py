"""The fine-tune probe: what each checkpoint becomes after a short fine-tune, and what it forgets.

- :mod:`analysis.finetune.config`: the settings (one frozen dataclass) and the job item's cache parameters;
- :mod:`analysis.finetune.data`: a task's training examples and the lm-eval spec its test split is scored by;
- :mod:`analysis.finetune.train`: fine-tune a copy of a loaded model (LoRA through peft, or full);
- :mod:`analysis.finetune.probe`: the job item: score, fine-tune, score again, held-out loss before and after;
- :mod:`analysis.finetune.windows`: catastrophic-overtraining windows (the pre-fine-tuning score rises while
  the post-fine-tuning score falls) with a family-wise error rate;
- :mod:`analysis.finetune.charts`: the Fine-tune page's figures.
"""

from __future__ import annotations

FINETUNE = "finetune"  # the name in --metrics, and the scope of every stored metric ("finetune/<task>/post")
