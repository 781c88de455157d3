"""The shared online protocol of every test-time method.

For each incoming unlabelled batch: ``steps_per_batch`` Adam steps on the method's loss, then predict
that batch with the updated model (dropout off). ``passes`` repeats this over all batches; the
returned predictions are those of the last pass — never a pass chosen by labels, which no method
ever sees. Augmentation randomness is fresh for every batch, drawn from a generator seeded by
(seed, pass, batch index).

``adapt.protocol=published`` follows the published test-time script instead (med-air/IOP-FL,
federated/model_trainer_segmentation.py): 10 passes unless ``passes`` is given (line 88), dropout
active when predicting (the model stays in train mode, line 65, and predicts at line 127), and the
random state re-seeded before every batch (line 94), so every batch of every pass draws the same
augmentations and dropout masks. The reported figure is still the last pass (line 145).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from iopfl.adapt.config import AdaptConfig
from iopfl.adapt.safeguard import BatchSignals, FallbackLog, SafeState, batch_signals, collapse_reason
from iopfl.models.factory import StateDict
from iopfl.models.routing import load_expert, use_batch_statistics
from iopfl.seeding import derive_generator, derive_seed


class TTAMethod:
    """Base: no adaptation, the global expert in eval mode (running statistics)."""

    name: ClassVar[str] = ""
    #: True when the method needs personalised experts besides the global model.
    needs_personal: ClassVar[bool] = False

    def __init__(
        self,
        experts: Sequence[StateDict],
        build: Callable[[], nn.Module],
        config: AdaptConfig,
        device: torch.device = torch.device("cpu"),
    ):
        self.experts, self.build, self.config, self.device = list(experts), build, config, device
        self.trace: list[dict[str, Any]] = []  # adaptive methods, per batch of the last pass: losses, signals
        self.fallbacks = FallbackLog()  # the safeguard's fallbacks in the last pass

    @property
    def published(self) -> bool:
        return self.config.protocol == "published"

    def make_model(self) -> nn.Module:
        """The network to adapt and predict with (fresh for every call of adapt_and_predict)."""
        return load_expert(self.build, self.experts[0], 0)

    def bn_adapted_global(self) -> nn.Module:
        """BN-adapt's network: the global expert normalised with the incoming batches' statistics."""
        model = load_expert(self.build, self.experts[0], 0)
        use_batch_statistics(model, self.config.min_batch_stats)
        return model

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the method updates; none → predict only."""
        return []

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, generator: torch.Generator, reference: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The weighted terms of the loss on batch ``x [B, C, H, W]`` (summed for the step);
        ``reference [B, K, H, W]``: BN-adapt's prediction of ``x`` (the trust region's target)."""
        raise NotImplementedError

    def start_pass(self, model: nn.Module) -> None:
        """Called before each pass over the batches (a method may reset what it records)."""

    def gate_state(self, model: nn.Module) -> tuple[torch.Tensor | None, float | None]:
        """Routing methods: each routed layer's mean gate sum over the last predicted batch ``[L]`` and
        the gates' mean spread; others (None, None)."""
        return None, None

    def gate_record(self, model: nn.Module) -> dict[str, list[float]]:
        """Routing methods: per-layer gate statistics of the last predicted batch for the trace."""
        return {}

    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Softmax ``[B, K, H, W]`` of a batch ``[B, C, H, W]``: eval mode, dropout off (on under the
        published protocol)."""
        model.eval()
        if self.published:
            keep_dropout(model)
        return model(x).softmax(dim=1)

    def adapt_and_predict(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Online adaptation over ``batches`` (inputs only, on the CPU) on ``device``; predictions of the
        last pass, on the CPU.

        Router initialisation and dropout draw from torch's global generator: it is seeded here, inside
        a forked RNG state so the caller's random stream is left untouched.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.config.seed, "adapt"))
            return self._run(batches)

    def _run(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        model = self.make_model().to(self.device)
        params = self.trainable(model)
        steps = self.config.steps_per_batch if params else 0
        optimizer = torch.optim.Adam(params, lr=self.config.lr) if steps else None
        predictions: list[torch.Tensor] = []
        for pass_ in range(self.config.pass_count if steps else 1):
            # BN-adapt, the reference of the safeguard, the trust region and the trace's signals: fresh
            # every pass, as BN-adapt itself would run over the stream
            reference = BNReference(self) if steps else None
            self.start_pass(model)
            self.trace, self.fallbacks = [], FallbackLog()
            start = SafeState(model, optimizer) if optimizer is not None and self.config.safeguard else None
            start_sums = None
            predictions = []
            for i, batch in enumerate(batches):
                x = batch.to(self.device)
                gen = self._generator(pass_, i)
                ref = reference(x) if reference is not None else None
                terms = self._steps(model, optimizer, steps, x, gen, ref) if optimizer is not None else {}
                probs = self.predict(model, x)
                record: dict[str, Any] = {
                    "pass": pass_,
                    "batch": i,
                    **self.gate_record(model),
                    **{f"loss_{k}": float(v.detach()) for k, v in terms.items()},
                }
                if ref is not None:
                    sums, spread = self.gate_state(model)
                    if start_sums is None and sums is not None:
                        start_sums = sums  # the first batch's: one step from the start
                    signals = batch_signals(probs, ref, sums, start_sums, spread)
                    record.update(signals.as_dict())
                    if start is not None:
                        probs = self._guard(model, x, probs, ref, signals, start, start_sums, record)
                if steps:
                    self.trace.append(record)
                predictions.append(probs.cpu())
        return predictions

    def _steps(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: int,
        x: torch.Tensor,
        gen: torch.Generator,
        ref: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """``steps`` Adam steps on the loss of batch ``x [B, C, H, W]``; the last step's loss terms."""
        terms: dict[str, torch.Tensor] = {}
        for _ in range(steps):
            model.train()
            terms = self.loss_terms(model, x, gen, ref)
            loss = sum(terms.values(), torch.zeros((), device=x.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return terms

    def _guard(
        self,
        model: nn.Module,
        x: torch.Tensor,
        probs: torch.Tensor,
        ref: torch.Tensor,
        signals: BatchSignals,
        start: SafeState,
        start_sums: torch.Tensor | None,
        record: dict[str, Any],
    ) -> torch.Tensor:
        """The safeguard on one predicted batch: keep it, or roll the method back to its start and
        predict again — BN-adapt's prediction if that fails too. Back to the start, not to the last
        batch that passed: a slow drift (TENT on a real polyp site) passes batch after batch while it
        pulls the model towards the threshold, so the last passing state is already half-way gone."""
        reason = collapse_reason(signals, self.config)
        if reason is None:
            self.fallbacks.add(None)
            return probs
        start.restore()
        probs = self.predict(model, x)
        sums, spread = self.gate_state(model)
        again = collapse_reason(batch_signals(probs, ref, sums, start_sums, spread), self.config)
        if again is not None:
            probs = ref
        self.fallbacks.add(reason, to_reference=again is not None)
        record["fallback"] = reason if again is None else f"{reason}, to bn"
        return probs

    def _generator(self, pass_: int, batch: int) -> torch.Generator:
        """Augmentation generator of one batch. Published: the same seed for every batch and pass, and
        torch's global generator (dropout) re-seeded with it too."""
        if self.published:
            torch.manual_seed(derive_seed(self.config.seed, "adapt", "published"))
            return derive_generator(self.config.seed, "adapt", "published")
        return derive_generator(self.config.seed, "adapt", pass_, batch)


class BNReference:
    """BN-adapt's prediction of every incoming batch (the global expert normalised with the stream's
    statistics, no steps): what the safeguard and the trust region compare with."""

    def __init__(self, method: TTAMethod):
        with torch.random.fork_rng(devices=[]):  # building it draws nothing from the method's random stream
            self.model = method.bn_adapted_global().to(method.device)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def keep_dropout(model: nn.Module) -> None:
    """Dropout layers back in train mode (active) while the rest of ``model`` stays as it is."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
