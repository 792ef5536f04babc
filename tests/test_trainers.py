"""dynabound inside Hugging Face's Trainer and Lightning, checkpoint resume included.

Each test trains a tiny model for STEPS steps in one go, then again as STEPS / 2 steps, a
checkpoint and a fresh process-like restart (new model, optimizer and trainer) that resumes
to STEPS, and asks for the same parameters and optimizer state, bit for bit. gamma is large
so the bounds have closed in on final_lr well before the checkpoint and the learning rate
has decayed by then: a resume that rebuilt final_lr from the decayed lr, or lost the
moments, would end elsewhere.

Neither framework is a dependency: without it these tests skip.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dynabound import AdaBound

STEPS = 12
HALF = STEPS // 2
BATCH = 4
HPARAMS = dict(lr=1e-2, final_lr=0.05, gamma=0.5)


class _Data(torch.utils.data.Dataset):
    """A fixed regression problem: 8 batches per epoch, so the checkpoint is mid-epoch."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = self.x @ torch.randn(6, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class _Net(torch.nn.Module):
    """Linear, LayerNorm, Linear: HF's Trainer puts the LayerNorm and the biases in a group
    without weight decay, so the optimizer has two param groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.body(x)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


def _assert_same_training_state(a_model, a_opt, b_model, b_opt, initial: dict) -> None:
    a_params, b_params = dict(a_model.named_parameters()), dict(b_model.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name, p in a_params.items():
        assert not torch.equal(p.detach(), initial[name]), f"{name} never moved"
        assert torch.equal(p.detach(), b_params[name].detach()), name
    a_state, b_state = a_opt.state_dict(), b_opt.state_dict()
    assert a_state["param_groups"] == b_state["param_groups"]
    assert a_state["state"].keys() == b_state["state"].keys()
    for index, state in a_state["state"].items():
        assert state.keys() == b_state["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, b_state["state"][index][key]), (index, key)
            if key == "step":
                assert value.item() == STEPS
    for group in b_state["param_groups"]:
        # the run really decayed lr, so resuming had to keep base_lr apart from it
        assert group["base_lr"] == HPARAMS["lr"] and group["lr"] < HPARAMS["lr"]


# --- Hugging Face Trainer -------------------------------------------------------------


def _hf_trainer(out_dir, how: str, stop_at: int | None = None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it and transformers does not pull it in

    class _StopAt(transformers.TrainerCallback):
        # ends the first run right after its checkpoint, as a killed job would have
        def on_step_end(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=HPARAMS["lr"],
        weight_decay=0.01,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=HALF,
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = _Net()
    kwargs: dict = {}
    if how == "optimizers":
        opt = AdaBound(model.parameters(), **HPARAMS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8 ** (step // 3))
        kwargs["optimizers"] = (opt, sched)
    else:
        # Trainer gives the class only the param groups: lr belongs in the kwargs.
        kwargs["optimizer_cls_and_kwargs"] = (AdaBound, dict(HPARAMS))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(), callbacks=[_StopAt()], **kwargs
    )
    return trainer, model


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_hf_trainer_resume_is_exact(tmp_path, how):
    whole, whole_model = _hf_trainer(tmp_path / "whole", how)
    initial = {n: p.detach().clone() for n, p in whole_model.named_parameters()}
    whole.train()
    assert whole.state.global_step == STEPS and isinstance(whole.optimizer.optimizer, AdaBound)

    first, _ = _hf_trainer(tmp_path / "split", how, stop_at=HALF)
    first.train()
    assert first.state.global_step == HALF
    checkpoint = tmp_path / "split" / f"checkpoint-{HALF}"
    assert (checkpoint / "optimizer.pt").exists()

    second, second_model = _hf_trainer(tmp_path / "split", how)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert second.state.global_step == STEPS
    _assert_same_training_state(
        whole_model, whole.optimizer.optimizer, second_model, second.optimizer.optimizer, initial
    )


# --- Lightning ------------------------------------------------------------------------


def _lightning_run(out_dir, epochs: int, resume_from=None):
    lightning = pytest.importorskip("lightning")
    pl = lightning.pytorch

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Net()

        def training_step(self, batch, batch_idx):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            opt = AdaBound(self.parameters(), **HPARAMS)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Lightning restarts the data of an epoch cut short, so the checkpoint closes an epoch
    # (HALF batches); no shuffling keeps both runs on one data order.
    loader = torch.utils.data.DataLoader(_Data(HALF * BATCH), batch_size=BATCH, shuffle=False)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=out_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    module = Module()
    initial = {n: p.detach().clone() for n, p in module.net.named_parameters()}
    with warnings.catch_warnings():
        # a 6-batch loader without workers is what this test wants
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck).*")
        trainer.fit(module, loader, ckpt_path=resume_from)
    return trainer, module, initial


def test_lightning_resume_is_exact(tmp_path):
    whole, whole_module, initial = _lightning_run(tmp_path / "whole", epochs=2)
    assert whole.global_step == STEPS

    first, _, _ = _lightning_run(tmp_path / "split", epochs=1)
    assert first.global_step == HALF
    (checkpoint,) = (tmp_path / "split").glob("*.ckpt")

    second, second_module, _ = _lightning_run(
        tmp_path / "resumed", epochs=2, resume_from=checkpoint
    )
    assert second.global_step == STEPS
    _assert_same_training_state(
        whole_module.net,
        whole.optimizers[0],
        second_module.net,
        second.optimizers[0],
        initial,
    )
    assert math.isclose(second.optimizers[0].param_groups[0]["lr"], HPARAMS["lr"] * 0.8**4)
