"""AdaBound in Hugging Face's Trainer, with a checkpoint and a resume.

A tiny BERT classifier (built from a config, nothing is downloaded) learns a synthetic task.
The same training runs twice: once straight through, once stopped right after the checkpoint
at half way (as a killed job would be) and resumed from it in a fresh Trainer. Both end with
the same weights, bit for bit: the checkpoint holds AdaBound's moments, step counts and
``base_lr``, the scheduler and the random state.

Trainer takes the optimizer in either of two ways, both shown here:

* ``optimizers=(optimizer, scheduler)``: you build both;
* ``optimizer_cls_and_kwargs=(AdaBound, kwargs)``: Trainer builds the optimizer from its own
  param groups (no weight decay for biases and LayerNorm) and its scheduler. It passes the
  class only the groups, so ``lr`` belongs in the kwargs: ``TrainingArguments.learning_rate``
  does not reach the optimizer.

Needs ``pip install transformers accelerate``. Run ``python examples/huggingface_trainer.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers

from dynabound import AdaBound

# gamma is large so that the bounds have closed in on final_lr before the checkpoint.
HPARAMS = dict(lr=1e-2, final_lr=0.05, gamma=0.5)
BATCH = 4


def make_model() -> transformers.PreTrainedModel:
    """A two-class BERT small enough to train on a CPU in a second."""
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    transformers.set_seed(0)  # the same initial weights in every run
    return transformers.BertForSequenceClassification(config)


def make_dataset(n: int = 32, length: int = 12) -> list[dict[str, torch.Tensor]]:
    """Random token sequences; the label says whether the first token is in the upper half of
    the vocabulary."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, length), generator=g)
    return [{"input_ids": x, "labels": (x[0] >= 32).long()} for x in ids]


class StopAt(transformers.TrainerCallback):
    """Ends training after step ``step``, as a job killed right after its checkpoint."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True


def make_trainer(
    output_dir: Path,
    steps: int,
    how: str = "optimizers",
    stop_at: int | None = None,
) -> transformers.Trainer:
    """A Trainer that checkpoints every ``steps // 2`` steps, with AdaBound given ``how``."""
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=HPARAMS["lr"],  # only for Trainer's own optimizer, if it built one
        weight_decay=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=steps // 2,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    model = make_model()
    if how == "optimizers":
        optimizer = AdaBound(model.parameters(), **HPARAMS)
        # the decayed lr scales both bounds too; final_lr stays relative to base_lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.8 ** (step // 3))
        choice = {"optimizers": (optimizer, scheduler)}
    elif how == "optimizer_cls_and_kwargs":
        choice = {"optimizer_cls_and_kwargs": (AdaBound, dict(HPARAMS))}
    else:
        raise ValueError(f"how must be 'optimizers' or 'optimizer_cls_and_kwargs', got {how!r}")
    return transformers.Trainer(
        model=model,
        args=args,
        train_dataset=make_dataset(),
        callbacks=[StopAt(stop_at)],
        **choice,
    )


def main(
    steps: int = 12, workdir: str | Path | None = None, how: str = "optimizers"
) -> dict[str, transformers.Trainer]:
    """Train ``steps`` steps straight through, then again with a stop and a resume half way;
    returns both trainers, ``{"uninterrupted": ..., "resumed": ...}``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)

        uninterrupted = make_trainer(root / "uninterrupted", steps, how)
        uninterrupted.train()

        half = steps // 2
        make_trainer(root / "interrupted", steps, how, stop_at=half).train()
        resumed = make_trainer(root / "interrupted", steps, how)
        resumed.train(resume_from_checkpoint=str(root / "interrupted" / f"checkpoint-{half}"))

    a, b = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended elsewhere"
    return {"uninterrupted": uninterrupted, "resumed": resumed}


if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()  # one bar per checkpoint file otherwise
    for how in ("optimizers", "optimizer_cls_and_kwargs"):
        runs = main(how=how)
        optimizer = runs["resumed"].optimizer.optimizer  # Trainer wraps it for accelerate
        print(f"{how}: the resumed run equals the uninterrupted one")
        print(f"  {type(optimizer).__name__}, lr at the end {optimizer.param_groups[0]['lr']:.2e}")
