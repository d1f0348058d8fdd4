"""Stage 3b, direct preference optimisation (DPO and its relatives, plus KTO).

The brief's loss: with sequence log-probs SUMMED over the response tokens only,

    loss = -log sigmoid(beta * ([log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]))

(Rafailov et al. 2023, Eq. 7). The policy runs ONE forward over the stacked [chosen; rejected]
batch; the reference log-probs come from `alignkit.train.reference` (copy / precomputed / lora).
Any loss of `alignkit.losses.preference.PREFERENCE_LOSSES` can replace "sigmoid"; it is resolved
once from the config. The inputs each loss gets (see docs/dpo.md):

- simpo and orpo get per-token AVERAGED log-probs, as their papers define them (SimPO: Meng et
  al. 2024, the length-normalised reward of Eq. 4; ORPO: Hong et al. 2024, Sec. 3, where
  P(y|x) is the length-normalised likelihood). ipo gets averages too: Azar et al. 2023 write
  sequence log-probs, but the common practice averages them so the regression target
  1/(2 tau) does not depend on length. All other losses get summed log-probs.
- rpo and orpo also get `chosen_nll`, the per-token mean NLL of the chosen response.
- soft labels of the records (`soft_label` / `label_prob`) are passed to the loss.

`loss: kto` trains on unpaired feedback (data kind "unpaired") with `kto_loss` (Ethayarajh et
al. 2024, Eq. 8). Its reference point z0 is estimated from mismatched pairs: each example j is
paired once, at load time, with the completion of another example (a seeded cyclic shift over a
shuffled order, so never its own when n > 1). Once per optimizer step, before the first forward,
z0 = max(0, mean_j [log pi - log pi_ref](partner completion | prompt_j)) is computed under no_grad
over the whole global batch: every micro-batch of every rank, the sums all-reduced (the loop's
`before_step` hook, which every rank calls once per step, so the collective cannot hang). N ranks
and any grad_accum therefore give one process's z0 for the same global batch.

    alignkit dpo --config configs/dpo.yaml model.path=runs/sft/final data.path=runs/world/preferences.jsonl
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignkit.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from alignkit.console import warn
from alignkit.data.batching import (
    PreferenceBatch,
    SFTBatch,
    UnpairedBatch,
    bucketed_batches,
    collate_preference,
    collate_sft,
    collate_unpaired,
    padding_fraction,
)
from alignkit.data.packing import (
    PackedBatch,
    PackedPairs,
    PackedUnpaired,
    SharedPromptPairs,
    collate_shared_prompt,
    pack,
    pack_preference,
    shared_prompt_is_cheaper,
)
from alignkit.data.tokenize import TokenizedPair, TokenizedSFT, TokenizedUnpaired
from alignkit.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    check_beta,
    get_preference_loss,
    kto_loss,
    preference_metrics,
)
from alignkit.train.loop import StepOutput
from alignkit.train.reference import (
    CopyReference,
    LoraReference,
    NoReference,
    PrecomputedReference,
    Reference,
    normalise,
    response_logps,
)

KTO = "kto"
AVERAGED_LOGPS = frozenset({"ipo", "simpo", "orpo"})
"""Losses fed per-token averaged log-probs (their papers' normalisation); the rest get sums."""
ReferenceMode = Literal["copy", "precomputed", "lora"]
_NOT_PARAMS = {"beta", "soft_label", "chosen_nll"}


def _loss_params_of(name: str) -> list[str]:
    fn = kto_loss if name == KTO else PREFERENCE_LOSSES[name]
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name not in _NOT_PARAMS]


def valid_losses() -> list[str]:
    """Every value `loss` accepts: the paired losses and 'kto'."""
    return sorted([*PREFERENCE_LOSSES, KTO])


@dataclass(frozen=True)
class Config:
    """DPO-family settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """`model.path`: the SFT model; the policy starts from it and it is the reference (required)."""
    data: DataConfig = field(default_factory=DataConfig)
    """`data.path`: preference pairs, or unpaired thumbs-up/down records for loss 'kto' (required)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=5e-6, batch_size=32, warmup_steps=10, schedule="linear")
    )
    """Training loop settings (DPO usually wants a small lr; a CPU-sized model needs a larger one)."""
    loss: str = "sigmoid"
    """Any name in alignkit.losses.preference.PREFERENCE_LOSSES, or 'kto' (unpaired data)."""
    beta: float = 0.1
    """Strength of the implicit KL penalty (tau for ipo, the reward scale for simpo, lambda for orpo)."""
    loss_params: dict = field(default_factory=dict)
    """Extra keyword arguments of the loss, e.g. {label_smoothing: 0.1}, {gamma: 0.5}, {alpha: 1.0}."""
    reference: ReferenceMode = "precomputed"
    """How reference log-probs are obtained: 'copy', 'precomputed' (cached on disk) or 'lora'."""
    reference_path: str | None = None
    """Reference model directory when it is not `model.path` (not with reference 'lora')."""
    cache_dir: str | None = None
    """Cache of precomputed reference log-probs (default OUT/ref_cache); share it to reuse across runs."""
    reference_batch_size: int = 64
    """Sequences per forward in the precomputing pass."""
    share_prompt: bool = True
    """Paired losses: each pair's prompt once (one row, tree attention mask) in batches where that is less work."""
    disable_dropout: bool = True
    """Zero every dropout of policy and reference, so the step-0 loss is exactly the no-change value."""
    eval_world: str | None = None
    """A world directory: after training, report the gold win rate of the trained model over model.path."""
    eval_limit: int = 0
    """Evaluate on this many of the world's held-out prompts, spread over categories (0: all)."""
    eval_max_new_tokens: int = 32
    """Longest greedy answer generated in the evaluation."""
    out: str = "runs/dpo"
    """Output directory; the model is saved to OUT/final."""

    def __post_init__(self):
        if self.loss not in valid_losses():
            raise ConfigError(
                f"config key 'loss': unknown preference loss {self.loss!r}; valid names: {', '.join(valid_losses())}"
            )
        if self.loss != KTO:
            get_preference_loss(self.loss)  # the registry is the authority on names
        allowed = _loss_params_of(self.loss)
        for key, value in self.loss_params.items():
            if key not in allowed:
                raise ConfigError(
                    f"config key 'loss_params.{key}': loss {self.loss!r} takes no parameter {key!r} "
                    f"(valid: {', '.join(allowed) or 'none'})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"config key 'loss_params.{key}': expected a number, got {value!r}")
        if self.reference == "lora" and self.uses_reference:
            if self.model.lora_r <= 0:
                raise ConfigError("config key 'reference': 'lora' needs model.lora_r > 0 (the policy's adapter)")
            if self.reference_path is not None:
                raise ConfigError("config key 'reference_path': not used with reference 'lora' (the base weights are)")
        if self.reference_batch_size < 1:
            raise ConfigError("config key 'reference_batch_size' must be >= 1")
        text = check_beta(self.beta, self.loss)
        if text is not None:
            warnings.warn(text, UserWarning, stacklevel=3)

    @property
    def is_unpaired(self) -> bool:
        """True for KTO, which reads unpaired records."""
        return self.loss == KTO

    @property
    def uses_reference(self) -> bool:
        """False for reference-free losses (SimPO, ORPO): no reference model at all."""
        return self.loss not in REFERENCE_FREE

    @property
    def average_logps(self) -> bool:
        """True when the loss is fed per-token averaged log-probs."""
        return self.loss in AVERAGED_LOGPS


# --- batches ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOBatch:
    """A preference micro-batch plus, in precomputed mode, its reference log-probs.

    pairs: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected (see PreferenceBatch),
        or with `train.packing` the same 2B sequences packed into one row (PackedPairs), or with
        `share_prompt` one row per pair, its prompt once (SharedPromptPairs).
    ref_logps: (2B,) reference log-probs aligned with the sequences, or None (computed in the step).
    """

    pairs: PreferenceBatch | PackedPairs
    ref_logps: torch.Tensor | None = None


def model_inputs(b: Any) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of `response_logps` / `Reference.logps` for the sequences of a padded
    batch (input_ids, attention_mask, labels) or a packed one (PackedBatch, or a container whose
    `packed` is one: position ids and sequence index instead of a mask)."""
    if isinstance(b, SharedPromptPairs):  # a (B, 1, L, L) tree mask and the sequence of each position
        return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                    position_ids=b.position_ids, seq_index=b.seq_index)
    p = b if isinstance(b, PackedBatch) else getattr(b, "packed", None)
    if p is not None:
        return dict(input_ids=p.input_ids, attention_mask=None, labels=p.labels, position_ids=p.position_ids,
                    seq_index=p.seq_index)
    return dict(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)


def num_tokens(b: Any) -> int:
    """Real (non-pad) tokens of a padded, packed or prompt-sharing batch."""
    if isinstance(b, SharedPromptPairs):
        return b.tokens
    p = b if isinstance(b, PackedBatch) else getattr(b, "packed", None)
    return p.input_ids.numel() if p is not None else int(b.attention_mask.sum())


@dataclass(frozen=True)
class KTOItem:
    """An unpaired example plus the completion of its mismatched partner (for z0)."""

    example: TokenizedUnpaired
    kl_completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.example.prompt_ids) + max(len(self.example.completion_ids), len(self.kl_completion_ids))


@dataclass(frozen=True)
class KTOBatch:
    """A KTO micro-batch.

    examples: (N, T) prompt + own completion, with `desirable` (N,) (packed: PackedUnpaired).
    mismatched: (N, T') prompt j + partner completion; labels on the completion only (packed: PackedBatch).
    ref_logps, ref_kl_logps: (N,) cached reference log-probs of both, or None.
    """

    examples: UnpairedBatch | PackedUnpaired
    mismatched: SFTBatch | PackedBatch
    ref_logps: torch.Tensor | None = None
    ref_kl_logps: torch.Tensor | None = None


class Indexed(Sequence):
    """items[j] -> (j, items[j]): the collate sees dataset indices to look cached values up."""

    def __init__(self, items: Sequence):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        return j, self.items[j]


def preference_columns(items: Sequence[TokenizedPair]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """The sequences whose reference log-probs a precomputed table holds, per dataset index."""
    return {
        "chosen": [(x.prompt_ids, x.chosen_ids) for x in items],
        "rejected": [(x.prompt_ids, x.rejected_ids) for x in items],
    }


def kto_columns(items: Sequence[KTOItem]) -> dict[str, list[tuple[list[int], list[int]]]]:
    return {
        "completion": [(x.example.prompt_ids, x.example.completion_ids) for x in items],
        "kl": [(x.example.prompt_ids, x.kl_completion_ids) for x in items],
    }


def make_preference_collate(
    pad_id: int, reference: Reference, packing: bool = False, share_prompt: tuple[int, int] | None = None,
):
    """Collate (index, pair) items into a DPOBatch, attaching cached reference log-probs; with
    `packing` the 2B sequences go into one row with no padding (`pack_preference`). With
    `share_prompt` = (hidden size, intermediate size) of the model (and not `packing`), a batch
    whose prompt-sharing rows cost less (`shared_prompt_is_cheaper`) holds each pair's prompt
    once in one row (`collate_shared_prompt`)."""

    def collate(indexed: list[tuple[int, TokenizedPair]]) -> DPOBatch:
        idx = [j for j, _ in indexed]
        items = [x for _, x in indexed]
        if packing:
            pairs: Any = pack_preference(items)
        elif share_prompt is not None and shared_prompt_is_cheaper(items, *share_prompt):
            pairs = collate_shared_prompt(items, pad_id)
        else:
            pairs = collate_preference(items, pad_id)
        ref = None
        if isinstance(reference, PrecomputedReference):
            ref = torch.cat([reference.lookup("chosen", idx), reference.lookup("rejected", idx)])
        return DPOBatch(pairs, ref)

    return collate


def make_kto_items(examples: Sequence[TokenizedUnpaired], max_len: int | None, seed: int) -> list[KTOItem]:
    """Pair every example with the completion of a partner: a cyclic shift over a seeded shuffle.

    The partner's completion is cut so prompt + completion <= max_len. With one example the
    partner is itself (z0 then measures its own completion).
    """
    n = len(examples)
    order = list(range(n))
    random.Random(f"alignkit-kto-mismatch-{seed}").shuffle(order)
    partner = [0] * n
    for k, j in enumerate(order):
        partner[j] = order[(k + 1) % n]
    items = []
    for j, ex in enumerate(examples):
        kl = list(examples[partner[j]].completion_ids)
        if max_len is not None:
            kl = kl[: max(max_len - len(ex.prompt_ids), 1)]
        items.append(KTOItem(ex, kl))
    return items


def make_kto_collate(pad_id: int, reference: Reference, packing: bool = False):
    """Collate (index, KTOItem) items into a KTOBatch (padded, or packed with `packing`)."""

    def collate(indexed: list[tuple[int, KTOItem]]) -> KTOBatch:
        idx = [j for j, _ in indexed]
        items = [x for _, x in indexed]
        prompts = [x.example.prompt_ids for x in items]
        if packing:
            desirable = torch.tensor([bool(x.example.desirable) for x in items], dtype=torch.bool)
            examples: Any = PackedUnpaired(pack(prompts, [x.example.completion_ids for x in items]), desirable)
            mismatched: Any = pack(prompts, [x.kl_completion_ids for x in items])
        else:
            examples = collate_unpaired([x.example for x in items], pad_id)
            mismatched = collate_sft([TokenizedSFT(p, x.kl_completion_ids) for p, x in zip(prompts, items)], pad_id)
        ref = ref_kl = None
        if isinstance(reference, PrecomputedReference):
            ref, ref_kl = reference.lookup("completion", idx), reference.lookup("kl", idx)
        return KTOBatch(examples, mismatched, ref, ref_kl)

    return collate


# --- steps ------------------------------------------------------------------------------------


def make_preference_step(cfg: Config, reference: Reference):
    """The step of every paired loss: one policy forward over [chosen; rejected], the loss
    resolved once, per-pair sum and the pair count to the loop."""
    loss_fn = get_preference_loss(cfg.loss)
    params = dict(cfg.loss_params)
    average = cfg.average_logps
    wants_nll = "chosen_nll" in inspect.signature(loss_fn).parameters
    beta = cfg.beta
    chunk = cfg.train.logprob_chunk

    def step(model: nn.Module, batch: DPOBatch) -> StepOutput:
        b, rows = batch.pairs, model_inputs(batch.pairs)
        ref = reference.logps(model, cached=batch.ref_logps, **rows)  # (2B,) | None
        sums, counts = response_logps(model, **rows, logprob_chunk=chunk)  # (2B,)
        policy_chosen, policy_rejected = b.split(normalise(sums, counts, average))
        ref_chosen, ref_rejected = b.split(ref) if ref is not None else (None, None)
        extra = {}
        if wants_nll:  # per-token mean NLL of the chosen response (Pang et al. 2024; Hong et al. 2024)
            extra["chosen_nll"] = -b.split(normalise(sums, counts, True))[0]
        out = loss_fn(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            beta=beta, soft_label=b.soft_label, **params, **extra,
        )
        metrics = preference_metrics(out, policy_chosen, policy_rejected)
        metrics["ntokens"] = float(num_tokens(b))
        return StepOutput(loss=out.losses.sum(), weight=b.num_pairs, metrics=metrics)

    return step


def kto_kl_sums(model: nn.Module, reference: Reference, batch: KTOBatch, chunk: int = 0) -> torch.Tensor:
    """(sum over the batch's mismatched pairs of log pi - log pi_ref, number of pairs), float64,
    without gradient (z0 is detached: skip DDP and keep no activations)."""
    mm_in = model_inputs(batch.mismatched)
    with torch.no_grad():
        ref_kl = reference.logps(model, cached=batch.ref_kl_logps, **mm_in)  # (N,)
        policy_kl, _ = response_logps(getattr(model, "module", model), **mm_in, logprob_chunk=chunk)
    diff = (policy_kl.detach() - ref_kl.detach()).to(torch.float64)
    return torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)])


def make_kto_step(cfg: Config, reference: Reference):
    """KTO: policy forward on the examples with gradient. z0 = max(0, mean KL estimate) over the
    mismatched pairs of the whole global batch (every micro-batch on every rank, all-reduced) is
    set once per optimizer step by `step.before_step`, so it does not depend on the number of
    ranks or on grad_accum; a step called without it estimates z0 from its own micro-batch."""
    params = dict(cfg.loss_params)
    beta = cfg.beta
    chunk = cfg.train.logprob_chunk
    global_z0: dict[str, torch.Tensor | None] = {"z0": None}

    def before_step(model: nn.Module, batches: list[tuple[KTOBatch, bool]]) -> None:
        sums = torch.zeros(2, dtype=torch.float64)
        for b, real in batches:  # a zero-weight copy still runs its forward: ZeRO-3/FSDP2 gather weights
            part = kto_kl_sums(model, reference, b, chunk).cpu()
            sums += part if real else 0.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dev = model_inputs(batches[0][0].examples)["input_ids"].device if batches else torch.device("cpu")
            t = sums.to(dev)
            torch.distributed.all_reduce(t)
            sums = t.cpu()
        global_z0["z0"] = torch.clamp(sums[0] / sums[1], min=0.0).to(torch.float32) if sums[1] > 0 else None

    def step(model: nn.Module, batch: KTOBatch) -> StepOutput:
        ex_in = model_inputs(batch.examples)
        ex = batch.examples
        ref = reference.logps(model, cached=batch.ref_logps, **ex_in)  # (N,)
        policy, _ = response_logps(model, **ex_in, logprob_chunk=chunk)  # (N,)
        z0 = global_z0["z0"]
        if z0 is None:  # called outside the loop: this micro-batch's own estimate
            s, n = kto_kl_sums(model, reference, batch, chunk).tolist()
            z0 = torch.tensor(max(0.0, s / n))
        z0 = z0.to(policy.device)
        out = kto_loss(policy, ref, ex.desirable, z0, beta=beta, **params)
        d = ex.desirable

        def mean_where(x: torch.Tensor, m: torch.Tensor) -> float:
            return float(x[m].mean()) if bool(m.any()) else 0.0

        chosen, rejected = mean_where(out.rewards, d), mean_where(out.rewards, ~d)
        metrics = {
            "kl": float(z0),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "logps/chosen": mean_where(policy.detach(), d),
            "logps/rejected": mean_where(policy.detach(), ~d),
            "desirable_frac": float(d.float().mean()),
            "ntokens": float(num_tokens(ex)),
        }
        return StepOutput(loss=out.losses.sum(), weight=len(d), metrics=metrics)

    step.before_step = before_step  # type: ignore[attr-defined]
    return step


# --- the stage --------------------------------------------------------------------------------


def sharing_prompts(cfg: Config, model: Any) -> tuple[int, int] | None:
    """(hidden, intermediate size) of the model when paired batches may take the prompt-sharing
    layout (`share_prompt` asked, no packing, attention that takes a custom mask: the policy's; a
    copy reference is the same class), else None."""
    from alignkit.models.chunked import supports_custom_mask, unwrap

    if not cfg.share_prompt or cfg.is_unpaired or cfg.train.packing or not supports_custom_mask(model):
        return None
    conf = unwrap(model).config
    hidden = int(getattr(conf, "hidden_size", 0) or 0)
    if hidden <= 0:
        return None
    return hidden, int(getattr(conf, "intermediate_size", None) or 4 * hidden)


def disable_dropout(model: nn.Module) -> None:
    """Zero every nn.Dropout and attention-dropout rate, so train-mode forwards are deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def evaluate_win_rate(policy: Any, cfg: Config, tokenizer: Any, out: Path | None = None) -> dict:
    """Greedy answers of the trained policy and of the starting model on held-out world prompts,
    judged by the gold judge; the win rate counts ties as half (`alignkit.eval.winrate.tally`,
    with its Wilson interval). With `out`, every prompt's two answers and scores go to
    OUT/eval_responses.jsonl (written atomically)."""
    from collections import defaultdict

    from alignkit.eval import gold
    from alignkit.eval.winrate import pairwise_outcomes, tally
    from alignkit.models.load import load_model
    from alignkit.world import load_world

    world = load_world(cfg.eval_world)
    prompts = gold.read_eval_prompts(cfg.eval_world, cfg.eval_limit)
    ecfg = gold.Config(model=str(cfg.model.path), world=str(cfg.eval_world), max_new_tokens=cfg.eval_max_new_tokens)
    base = load_model(cfg.model.path)
    base_summary, base_rows = gold.evaluate(base, tokenizer, world, prompts, ecfg)
    del base
    summary, rows = gold.evaluate(policy, tokenizer, world, prompts, ecfg)
    outcomes = pairwise_outcomes([r["score"] for r in rows], [b["score"] for b in base_rows])
    by_cat: dict[str, list[float]] = defaultdict(list)
    for r, x in zip(rows, outcomes):
        by_cat[r["category"]].append(x)
    if out is not None:
        gold.write_jsonl_atomic(out / "eval_responses.jsonl", [
            {"prompt": r["prompt"], "category": r["category"], "response": r["response"], "score": r["score"],
             "start_response": b["response"], "start_score": b["score"]}
            for r, b in zip(rows, base_rows)
        ])
    return {
        **tally(outcomes),  # n, wins, ties, losses, win_rate and its 95% Wilson interval
        "gold_score": summary["gold_score"],
        "gold_score_start": base_summary["gold_score"],
        "per_category": summary["per_category"],
        "per_category_start": base_summary["per_category"],
        "win_rate_per_category": {c: sum(xs) / len(xs) for c, xs in sorted(by_cat.items())},
    }


def _load_data(cfg: Config, tokenizer: Any):
    from alignkit.data.load import DataError, load_records
    from alignkit.data.tokenize import TruncationLimits, tokenize_preference, tokenize_unpaired

    kind = "unpaired" if cfg.is_unpaired else "preference"
    loaded = load_records(cfg.data.path, kind=kind, on_error=cfg.data.on_error, limit=cfg.data.limit)
    limits = TruncationLimits(max_prompt_len=cfg.data.max_prompt_len, max_len=cfg.data.max_len)
    if cfg.is_unpaired:
        examples, trunc = tokenize_unpaired(tokenizer, loaded.records, limits)
        items: list = make_kto_items(examples, limits.max_len, cfg.train.seed)
        columns = kto_columns(items)
    else:
        from alignkit.data.lint import check_signal

        signal = check_signal(loaded.records, cfg.data.path, cfg.data.max_no_signal)
        if signal:
            warn(signal)
        items, trunc = tokenize_preference(tokenizer, loaded.records, limits)
        columns = preference_columns(items)
    warn(trunc.warnings(limits, cfg.data.path))
    if not items:
        raise DataError(cfg.data.path, f"no usable {kind} records after tokenisation and truncation")
    return loaded, items, columns, trunc


def run(cfg: Config) -> dict:
    from alignkit.models.load import apply_lora, load_model, load_tokenizer, save_model
    from alignkit.train import reference as ref_lib
    from alignkit.train.loop import _make_accelerator, train

    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required (the SFT model directory)")
    if not cfg.data.path:
        raise ConfigError("config key 'data.path' is required (the preference data file)")
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    loaded, items, columns, trunc = _load_data(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    acc = _make_accelerator(cfg.train)
    precision = "bf16" if acc.mixed_precision == "bf16" else "fp32"

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model.path)
    if cfg.disable_dropout:
        disable_dropout(model)
    model = apply_lora(model, cfg.model)
    ref_path = cfg.reference_path or cfg.model.path

    reference: Reference
    cache: dict[str, Any] = {}
    if not cfg.uses_reference:
        reference = NoReference()
    elif cfg.reference == "copy":
        ref_model = load_model(ref_path)
        if cfg.disable_dropout:
            disable_dropout(ref_model)
        reference = CopyReference(ref_model.to(acc.device), average=cfg.average_logps,
                                  logprob_chunk=cfg.train.logprob_chunk)
    elif cfg.reference == "lora":
        reference = LoraReference(average=cfg.average_logps, logprob_chunk=cfg.train.logprob_chunk)
    else:
        key = ref_lib.cache_key(
            ref_lib.fingerprint_files(ref_path),
            ref_lib.fingerprint_sequences(columns),
            cfg.average_logps,
            f"{precision}/{acc.device.type}",
        )
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "ref_cache"

        def compute() -> dict[str, torch.Tensor]:
            # Before any update the policy IS the reference (LoRA starts as a no-op), so only a
            # separate reference_path needs a model loaded for this pass.
            m = model if cfg.reference_path is None else load_model(ref_path)
            if cfg.disable_dropout:
                disable_dropout(m)
            m.to(acc.device)
            return ref_lib.precompute_logps(
                m, columns, pad_id, cfg.average_logps, cfg.reference_batch_size,
                device=acc.device, autocast=acc.autocast, progress=cfg.train.progress,
                logprob_chunk=cfg.train.logprob_chunk, share_prompt=sharing_prompts(cfg, m),
            )

        sizes = {name: len(seqs) for name, seqs in columns.items()}
        table, hit = ({}, False)
        if acc.is_main_process:
            table, hit = ref_lib.load_or_precompute(cache_dir, key, sizes, compute, meta={"model": str(ref_path)})
        acc.wait_for_everyone()
        if not acc.is_main_process:
            table, hit = ref_lib.load_or_precompute(cache_dir, key, sizes, compute, write=False)
        reference = PrecomputedReference(table)
        cache = {"path": str(ref_lib.cache_path(cache_dir, key)), "hit": hit, "key": key}

    share = sharing_prompts(cfg, model)
    if cfg.is_unpaired:
        collate, step = make_kto_collate(pad_id, reference, cfg.train.packing), make_kto_step(cfg, reference)
    else:
        collate = make_preference_collate(pad_id, reference, cfg.train.packing, share)
        step = make_preference_step(cfg, reference)
    lengths = [len(x) for x in items]

    def plan(epoch: int) -> list[list[int]]:
        return bucketed_batches(lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch)

    result = train(
        model, step, Indexed(items), collate, plan, cfg.train, out,
        save_fn=lambda m, d: save_model(m, tokenizer, d), accelerator=acc,
        weight_fn=(lambda b: float(len(b.examples.desirable))) if cfg.is_unpaired else (lambda b: float(b.pairs.num_pairs)),
        before_step=getattr(step, "before_step", None),
        name=f"dpo ({cfg.loss})",
    )
    summary = {
        "model": str(result.final_dir),
        "loss_name": cfg.loss,
        "reference": reference.mode,
        "reference_cache": cache or None,
        "records": len(loaded.records),
        "skipped": len(loaded.skipped),
        "format": loaded.format,
        "truncation": trunc.report(),
        "padding_fraction": padding_fraction(lengths, plan(0)),
        "final_loss": result.metrics.get("loss"),
        "metrics": {k: v for k, v in result.metrics.items() if "/" in k or k == "kl"},
        "steps": result.step,
        "wall_s": result.wall_time_s,
        "peak_mem_mb": result.peak_memory_mb,
    }
    if cfg.eval_world and acc.is_main_process:
        summary["eval"] = evaluate_win_rate(acc.unwrap_model(model), cfg, tokenizer, out)
    return summary
