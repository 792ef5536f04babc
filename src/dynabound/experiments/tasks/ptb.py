"""Word-level language modelling (Penn Treebank or any corpus in its format) with LSTMs."""

from __future__ import annotations

import argparse
import itertools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data import batchify, bptt_batches, load_corpus
from ..models import LSTMLanguageModel, detach_hidden
from ..optimizers import COMPARED
from .base import EpochContext, EpochState, Task, check_positive

__all__ = ["PTBTask"]


class PTBTask(Task):
    """Truncated BPTT over ``batch_size`` parallel streams of the training text.

    Under DDP the ``batch_size`` columns are split between the ranks, so the ranks together
    see exactly the single-process batch and DDP's averaged gradient (clipped afterwards)
    is the single-process gradient.
    """

    name = "ptb"
    description = (
        "word-level language model on Penn Treebank (or any directory with train/valid/test "
        "text files in its format): a 1-, 2- or 3-layer LSTM, perplexity, truncated BPTT, "
        "gradient clipping"
    )
    metric = "perplexity"
    defaults = {"epochs": 40, "batch_size": 20, "milestones": [], "lr_decay": 0.1}
    optimizers = COMPARED

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument(
            "--layers", type=int, choices=(1, 2, 3), default=None, help="LSTM layers (default 1)"
        )
        parser.add_argument("--embed", type=int, default=None, help="embedding size (default 200)")
        parser.add_argument("--hidden", type=int, default=None, help="LSTM width (default 200)")
        parser.add_argument("--dropout", type=float, default=None, help="dropout (default 0)")
        parser.add_argument(
            "--tie", action="store_true", default=None, help="tie embedding and decoder weights"
        )
        parser.add_argument(
            "--bptt", type=int, default=None, help="truncated BPTT length (default 35)"
        )
        parser.add_argument(
            "--clip",
            type=float,
            default=None,
            help="gradient-norm clipping, 0 to disable (default 0.25)",
        )
        parser.add_argument(
            "--eval-batch-size", type=int, default=None, help="streams for evaluation (default 10)"
        )

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {
            "layers": ns.layers,
            "embed": ns.embed,
            "hidden": ns.hidden,
            "dropout": ns.dropout,
            "tie": ns.tie,
            "bptt": ns.bptt,
            "clip": ns.clip,
            "eval_batch_size": ns.eval_batch_size,
        }

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_positive(args, "layers", "embed", "hidden", "bptt", "eval_batch_size")
        dropout, clip = args.get("dropout"), args.get("clip")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
        if clip is not None and not clip >= 0:
            raise ValueError(f"--clip must be 0 (off) or positive, got {clip}")
        if args.get("tie") and args.get("embed", 200) != args.get("hidden", 200):
            raise ValueError("--tie needs --embed equal to --hidden")

    @classmethod
    def run_name(cls, config: dict[str, Any]) -> str:
        return f"ptb-{config['task_args'].get('layers') or 1}layer-{config['optim']}"

    def _arg(self, key: str, default: Any) -> Any:
        value = self.args.get(key)
        return default if value is None else value

    def load_data(self) -> None:
        corpus = load_corpus(self.config["data_dir"], download=self.config.get("download", False))
        batch, world = int(self.config["batch_size"]), self.dist.world_size
        if batch % world:
            raise ValueError(f"batch size {batch} is not divisible by the {world} processes")
        local = batch // world
        columns = batchify(corpus.train, batch)
        self.train = columns[:, self.dist.rank * local : (self.dist.rank + 1) * local]
        self.train = self.train.contiguous().to(self.device)
        eval_batch = int(self._arg("eval_batch_size", 10))
        self.valid = batchify(corpus.valid, eval_batch).to(self.device)
        self.test = batchify(corpus.test, eval_batch).to(self.device)
        self.bptt = int(self._arg("bptt", 35))
        self.clip = float(self._arg("clip", 0.25))
        self.model_spec = {
            "vocab_size": len(corpus.vocab),
            "embed_dim": int(self._arg("embed", 200)),
            "hidden_dim": int(self._arg("hidden", 200)),
            "num_layers": int(self._arg("layers", 1)),
            "dropout": float(self._arg("dropout", 0.0)),
            "tie_weights": bool(self._arg("tie", False)),
        }

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return LSTMLanguageModel(**spec)

    def train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: EpochContext
    ) -> dict[str, float]:
        model.train()
        hidden = cast(LSTMLanguageModel, ctx.raw_model).init_hidden(self.train.shape[1])
        total = math.ceil((self.train.shape[0] - 1) / self.bptt)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        tokens = 0
        if ctx.resume_state is not None:
            # The hidden state carried from the last window into the next one.
            hidden = tuple(h.to(ctx.device).clone() for h in ctx.resume_state["hidden"])
            loss_sum = ctx.resume_state["loss_sum"].to(ctx.device).clone()
            tokens = int(ctx.resume_state["tokens"])

        def state() -> dict[str, Any]:
            return {
                "hidden": tuple(h.detach().clone() for h in hidden),
                "loss_sum": loss_sum.clone(),
                "tokens": tokens,
            }

        first = ctx.start_batch
        windows = ctx.progress(
            itertools.islice(bptt_batches(self.train, self.bptt), first, None),
            total=total,
            initial=first,
            desc=f"epoch {ctx.epoch}",
        )
        for i, (x, y) in enumerate(windows, start=first):
            hidden = detach_hidden(hidden)
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                logits, hidden = model(x, hidden)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            if self.clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            optimizer.step()
            ctx.global_step += 1
            loss_sum += loss.detach() * y.numel()
            tokens += y.numel()
            ctx.on_batch(i, state)
        loss_value, token_count = float(loss_sum), float(tokens)
        if ctx.dist.enabled:
            import torch.distributed as tdist

            t = torch.tensor([loss_value, token_count], dtype=torch.float64, device=ctx.device)
            tdist.all_reduce(t)
            loss_value, token_count = t.tolist()
        train_loss = loss_value / token_count
        return {"train_loss": train_loss, "train_ppl": _ppl(train_loss)}

    def running_loss(self, state: EpochState) -> float | None:
        return float(state["loss_sum"]) / state["tokens"] if state["tokens"] else None

    @torch.no_grad()
    def _nll(self, model: LSTMLanguageModel, data: torch.Tensor, ctx: EpochContext) -> float:
        hidden = model.init_hidden(data.shape[1])
        total, tokens = 0.0, 0
        for x, y in bptt_batches(data, self.bptt):
            with ctx.autocast():
                logits, hidden = model(x, hidden)
            total += float(
                F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            )
            tokens += y.numel()
        return total / tokens

    def evaluate(self, model: nn.Module, ctx: EpochContext) -> dict[str, float]:
        # Every rank evaluates the (small) validation and test streams in full with
        # identical weights, so no communication is needed and all ranks agree.
        raw = cast(LSTMLanguageModel, ctx.raw_model)
        raw.eval()
        valid, test = self._nll(raw, self.valid, ctx), self._nll(raw, self.test, ctx)
        return {
            "valid_loss": valid,
            "valid_ppl": _ppl(valid),
            "test_loss": test,
            "test_ppl": _ppl(test),
        }

    def summary(self, metrics: dict[str, Any]) -> str:
        return (
            f"train ppl {metrics['train_ppl']:.2f} | valid ppl {metrics['valid_ppl']:.2f} | "
            f"test ppl {metrics['test_ppl']:.2f}"
        )


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))
