"""The training loop: run directory -> model (init or resume) -> FSDP2 -> data -> steps -> checkpoints -> export.

One optimizer step = `grad_accum` micro-batches per rank. The loss is Molmo's: summed masked cross-entropy over
all micro-batches of the step, divided by the global number of loss tokens / world size (all-reduced before the
first forward), so averaging gradients over ranks gives the exact per-token mean of the global batch whatever the
world size or accumulation split. The LM z-loss and the MoE aux losses use the same divisor.
"""

import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from molmo_fast.outdir import OutputDirError, check_output_dir, claim_output_dir, remove_own_output
from molmo_fast.runtime.checkpoints import checkpoint_dirs
from molmo_fast.runtime.device import Env, init_distributed, to_device
from molmo_fast.runtime.export import check_export_dir, export_sharded_model
from molmo_fast.runtime.loss import loss_positions, masked_token_sums
from molmo_fast.runtime.parallelize import parallelize
from molmo_fast.train import checkpoint as ckpt
from molmo_fast.train import elastic
from molmo_fast.train.config import Config
from molmo_fast.train.data import TrainData, build_mixture, preprocessor_config, write_preprocessor_dir
from molmo_fast.train.metrics import StepReporter
from molmo_fast.train.optim import build_optimizer, clip_grad_norms, set_learning_rates
from molmo_fast.train.resume import check_resume, config_record, find_resume_target, record_changes
from molmo_fast.train.validation import validate


class TrainingDiverged(RuntimeError):
    pass


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def preflight(cfg: Config, env: Env) -> None:
    """Everything about the configuration that can fail, checked before the run dir is touched."""
    from molmo_fast.data.image_preprocessing import ImageConfig

    run_dir = Path(cfg.train.run_dir)
    try:
        cfg.train.grad_accum_steps(env.world_size)
        limit = cfg.model.build_config().llm.max_sequence_length
        if cfg.data.sequence_length > limit:
            raise ValueError(f"DataConfig.sequence_length = {cfg.data.sequence_length}: expected at most the "
                             f"model's max_sequence_length {limit}")
        ImageConfig.from_dict(preprocessor_config(cfg.data), source="DataConfig.preprocessor + image_overrides")
        if cfg.train.export_hf_at_end:
            check_export_dir(run_dir, run_dir / "hf", overwrite=True)
    except (ValueError, OSError) as e:
        raise SystemExit(f"molmo_fast.train: bad configuration: {e}") from None


def _run_dir_problem(run_dir: Path, resuming: bool) -> str | None:
    if resuming or checkpoint_dirs(run_dir):
        hint = "pass --resume latest to continue it, or choose another TrainConfig.run_dir"
    else:
        hint = "it has no checkpoint to resume: remove it or choose another TrainConfig.run_dir"
    try:
        check_output_dir(run_dir, "train_run", reuse=resuming, overwrite_hint=hint)
    except OutputDirError as e:
        return f"molmo_fast.train: {e}"
    return None


def prepare_run_dir(cfg: Config, env: Env, resume_state: dict | None, changes: list) -> bool:
    """Claims the run dir (molmo_fast.outdir: never one holding other files, a new run never an existing one)
    and writes its description; returns whether this call created the run.

    The run dir describes itself: config.gin (every binding), operative_config.gin (after the first step),
    git_revision.txt, model_config.json (HF format) and preprocessor/ (the exact preprocessing files); settings
    changed on resume (`--allow_changed`) rewrite them, keeping the old ones under config_history/."""
    run_dir = Path(cfg.train.run_dir)
    resuming = resume_state is not None
    # Rank 0's view, taken before anyone writes, decides for all ranks.
    verdict = [None, False]
    if env.is_main:
        verdict = [_run_dir_problem(run_dir, resuming), not run_dir.is_dir() or not any(run_dir.iterdir())]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise SystemExit(verdict[0])
    if env.is_main:
        claim_output_dir(run_dir, "train_run", reuse=resuming)
        if not resuming:
            (run_dir / "config.gin").write_text(cfg.gin_config)
            model_config = cfg.model.build_config()
            elastic.record(model_config, cfg.elastic)
            model_config.to_hf_json(run_dir / "model_config.json")
            write_preprocessor_dir(cfg.data, run_dir / "preprocessor")
        elif changes:
            for name, old, new in changes:
                print(f"molmo_fast.train: resuming with {name} changed from {old!r} to {new!r} (--allow_changed)",
                      flush=True)
            record_changes(run_dir, resume_state["step"], changes, cfg)
        (run_dir / "git_revision.txt").write_text(git_revision() + "\n")
    dist.barrier()
    return bool(verdict[1])


def build_model(cfg: Config, env: Env) -> nn.Module:
    """Every rank builds the model on meta and shards it; rank 0 alone materialises the initial weights on CPU
    (HF checkpoint, parts, or fresh init) and broadcasts them, so the start is identical whatever the world size."""
    from molmo_fast.config import MolmoEConfig
    from molmo_fast.model.molmoe import MolmoE

    mcfg = MolmoEConfig.from_hf_json(Path(cfg.train.run_dir) / "model_config.json")
    mcfg.moe.impl = cfg.model.moe_impl
    mcfg.moe.load_balancing_weight = cfg.train.moe_lb_weight
    mcfg.moe.z_loss_weight = cfg.train.moe_zloss_weight
    full_sd = {}
    if env.is_main:
        if cfg.model.init_from:
            source = MolmoE.from_pretrained(cfg.model.init_from, dtype=torch.float32, device="cpu")
        else:
            source = MolmoE.from_config_on_meta(mcfg).init_weights(cfg.model.init_seed, scheme=cfg.model.init_scheme)
        if cfg.model.llm_from or cfg.model.vit_from:
            from molmo_fast.train.init_parts import load_parts

            load_parts(source, llm_from=cfg.model.llm_from, vit_from=cfg.model.vit_from)
        full_sd = source.state_dict()
    model = MolmoE.from_config_on_meta(mcfg)
    parallelize(model, env.device, bf16=cfg.train.bf16, activation_checkpointing=cfg.train.activation_checkpointing,
                compile_blocks=cfg.train.compile, compile_model=cfg.train.compile_model)
    model.to_empty(device=env.device)
    ckpt.load_full_state_dict(model, full_sd)
    model.reset_runtime_buffers()
    return model.train()


def gradient_sync_steps(model: nn.Module, micro_batches: list[dict], defer: bool) -> Iterator[tuple[int, dict]]:
    """The step's micro-batches, enumerated. With `defer`, an FSDP2 model reduce-scatters gradients only in the
    backward of the last one: one reduce-scatter per step instead of per micro-batch, at the price of holding
    unsharded gradients across the step (the full model's gradients on every rank), hence off by default."""
    fsdp = defer and isinstance(model, FSDPModule)
    for i, batch in enumerate(micro_batches):
        if fsdp:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        yield i, batch


def micro_batch_loss(model: nn.Module, batch: dict, divisor: torch.Tensor, lm_zloss_weight: float, n_micro: int,
                     want_router: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list | None]:
    """Loss of one micro-batch (already divided by the global divisor) and its detached parts.
    `batch` carries its `loss_positions`."""
    out = model(input_ids=batch["input_ids"], images=batch.get("images"), image_masks=batch.get("image_masks"),
                image_input_idx=batch.get("image_input_idx"), position_ids=batch.get("position_ids"),
                subsegment_ids=batch.get("subsegment_ids"), output_router_logits=want_router,
                logits_at=batch["loss_at"], right_padded=True, response_mask=batch["response_mask"])
    sums = masked_token_sums(out.logits, batch["loss_labels"], batch["loss_weight"])
    lm_loss, z_loss = sums["ce"] / divisor, sums["zloss"] / divisor
    loss = lm_loss + lm_zloss_weight * z_loss
    moe_aux = getattr(out, "aux_loss", None)
    if moe_aux is not None:
        # Per micro-batch means, averaged over the micro-batches of the step (as Molmo does).
        loss = loss + moe_aux / n_micro
    parts = {"lm_loss": lm_loss.detach(), "zloss": z_loss.detach(), "correct": sums["correct"].detach() / divisor}
    if moe_aux is not None:
        parts["moe_aux_loss"] = moe_aux.detach() / n_micro
    return loss, parts, getattr(out, "router_logits", None)


@torch.no_grad()
def router_stats(model: nn.Module, router_logits: list[torch.Tensor], batch: dict) -> dict[str, float]:
    """Expert-load balance of a micro-batch: LB loss, router z-loss and the spread of per-expert load, with each
    layer's experts chosen as that layer routes them (its k, K_max and routing policy)."""
    from molmo_fast.model.moe import expert_load, load_balancing_loss, route, router_z_loss

    llm = model.llm
    moes = [block.moe for i, block in enumerate(llm.blocks) if i not in llm.skip_blocks]  # the layers that ran
    valid_T = (batch["input_ids"] != -1).flatten()
    lb, rz, cv, max_frac = [], [], [], []
    for logits_TE, moe in zip(router_logits, moes, strict=True):
        idx_TK, _ = route(logits_TE, moe.k_max, moe.top_k, moe.policy)
        lb.append(load_balancing_loss(logits_TE, idx_TK, valid_T))
        rz.append(router_z_loss(logits_TE, valid_T))
        load_E = expert_load(idx_TK.masked_fill(~valid_T.unsqueeze(-1), -1), logits_TE.shape[-1]).float()
        frac_E = load_E / load_E.sum().clamp_min(1)
        cv.append(frac_E.std() / frac_E.mean().clamp_min(1e-9))
        max_frac.append(frac_E.max())
    stats = {"moe/lb_loss": lb, "moe/router_zloss": rz, "moe/expert_load_cv": cv, "moe/max_expert_frac": max_frac}
    return {name: float(torch.stack(values).mean()) for name, values in stats.items()}


@dataclass
class StepOutput:
    """What one optimizer step reports (host floats): loss parts averaged over ranks (`loss`, `lm_loss`, `zloss`,
    `correct` = token accuracy, `moe_aux_loss` when weighted), pre-clip grad norms per group and in total, the
    learning rates, the global loss-token count, tokens processed by all ranks and, when asked, router stats."""

    losses: dict[str, float]
    grad_norms: dict[str, float]
    lrs: dict[str, float]
    loss_tokens: float
    tokens: int
    router: dict[str, float] = field(default_factory=dict)
    pass_losses: list[float] = field(default_factory=list)  # elastic sandwich: the loss of each pass


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, by_group: dict[str, list[nn.Parameter]],
               micro_batches: list[dict], step: int, cfg: Config, env: Env, want_router: bool = False,
               passes: list[elastic.Pass] | None = None) -> StepOutput:
    """One optimizer step over this rank's micro-batches (host copies; each gains its `loss_positions`).
    `passes`: the elastic top-k of each forward/backward pass per micro-batch (set on the model before it; the
    step's loss is their mean); None trains the model as it is. Collective. Raises `TrainingDiverged`, before
    touching the weights, if the loss or a grad norm is not finite."""
    # Everything the host needs about the batches (loss positions, token counts for the divisor) comes from the
    # host copies: no device sync inside the step until its one .tolist().
    for b in micro_batches:
        b.update(loss_positions(b))
    loss_tokens = torch.stack([b["loss_tokens"] for b in micro_batches]).sum().to(env.device)
    dist.all_reduce(loss_tokens)
    divisor = (loss_tokens / env.world_size).clamp_min(1.0)

    lrs = set_learning_rates(optimizer, step, cfg.train.max_steps, cfg.optim.final_lr_ratio)
    totals: dict[str, torch.Tensor] = {}
    router = {}
    passes = passes or [None]
    n_pass = len(passes)
    for i, host_batch in gradient_sync_steps(model, micro_batches, cfg.train.defer_grad_sync):
        batch = to_device(host_batch, env.device)  # one micro-batch on the device at a time
        for j, k_pass in enumerate(passes):
            if k_pass is not None:
                elastic.apply(model, k_pass)  # data only; this pass's backward (and AC recompute) runs at it too
            loss, parts, router_logits = micro_batch_loss(model, batch, divisor * n_pass, cfg.train.lm_zloss_weight,
                                                          len(micro_batches) * n_pass, want_router and i == j == 0)
            loss.backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v
            if n_pass > 1:
                pass_loss = parts["lm_loss"] + cfg.train.lm_zloss_weight * parts["zloss"] + parts.get("moe_aux_loss", 0)
                totals[f"pass{j}"] = totals.get(f"pass{j}", 0) + n_pass * pass_loss
            if router_logits:
                router = router_stats(model, router_logits, batch)
    if passes[0] is not None:
        elastic.restore(model, cfg.elastic)  # validation, checkpoints and export see the model's own k
    totals["loss"] = totals["lm_loss"] + cfg.train.lm_zloss_weight * totals["zloss"] + totals.get("moe_aux_loss", 0)
    names = sorted(totals)
    reduced = torch.stack([totals[k] for k in names])
    dist.all_reduce(reduced)
    norms = clip_grad_norms(by_group, cfg.optim.max_grad_norm)
    # The step's one host sync: loss parts and grad norms together (the NaN guard needs both).
    values = torch.cat([reduced / env.world_size, torch.stack(list(norms.values())).to(reduced),
                        loss_tokens.view(1).to(reduced)]).tolist()
    losses = dict(zip(names, values[:len(names)], strict=True))
    pass_losses = [losses.pop(f"pass{j}") for j in range(n_pass)] if n_pass > 1 else [losses["loss"]]
    grad_norms = dict(zip(norms, values[len(names):-1], strict=True))
    bad = [k for k, v in {"loss": losses["loss"], **grad_norms}.items() if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"step {step}: non-finite {', '.join(bad)} (loss={losses['loss']}, grad norms="
                               f"{grad_norms}); stopped before the optimizer step")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in micro_batches) * env.world_size
    return StepOutput(losses, grad_norms, lrs, values[-1], tokens, router, pass_losses)


def _due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def train(cfg: Config, resume: str | None = None, allow_changed: tuple[str, ...] = ()) -> dict:
    """Runs (or resumes) a training job; returns the final step's metrics. `resume`: "latest" or a checkpoint dir;
    `allow_changed`: Class.field names whose change since the checkpoint is accepted (molmo_fast/train/resume.py).

    The whole configuration and the resume target are checked before anything is written; a run that fails
    before its first step removes the run directory it created, so the retry starts clean."""
    env = init_distributed(always_group=True)
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.run_dir)
    resume_path, state, changes = None, None, []
    if resume:
        resume_path = find_resume_target(run_dir, resume)
        state, changes = check_resume(resume_path, cfg, list(allow_changed))
    preflight(cfg, env)
    model_config = cfg.model.build_config()
    sampler = elastic.KSampler(cfg.elastic, model_config.llm.n_layers, model_config.moe.top_k)  # checks the ks
    if state and "elastic" in state:
        sampler.load_state_dict(state["elastic"])
    if env.is_main:  # generate missing synthetic shard sets once, before every rank opens them
        build_mixture(cfg.data)
    dist.barrier()
    created = prepare_run_dir(cfg, env, state, changes)
    steps_done = [0]
    try:
        stream_changed = any(name.startswith("DataConfig.") or name == "TrainConfig.global_batch_size"
                             for name, _, _ in changes)
        return _train(cfg, env, run_dir, resume_path, state or {}, stream_changed, sampler, steps_done)
    except BaseException:
        if created and env.is_main and steps_done[0] == 0 and remove_own_output(run_dir, "train_run"):
            print(f"molmo_fast.train: the run failed before its first step; removed {run_dir}", file=sys.stderr)
        raise


def _train(cfg: Config, env: Env, run_dir: Path, resume_path: Path | None, state: dict, stream_changed: bool,
           sampler: elastic.KSampler, steps_done: list) -> dict:
    grad_accum = cfg.train.grad_accum_steps(env.world_size)
    model = build_model(cfg, env)
    optimizer, by_group = build_optimizer(model, cfg.optim)
    start_step = 0
    if resume_path is not None:
        ckpt.load_checkpoint(resume_path, model, optimizer)
        start_step = state["step"]
    else:
        torch.manual_seed(cfg.train.seed + env.rank)  # dropout differs per rank; the weights were broadcast
    try:  # the loader checks its own stream settings (shard files, world size) against the checkpoint's
        data = TrainData(cfg.data, run_dir / "preprocessor", env.rank, env.world_size, cfg.train.micro_batch_size,
                         grad_accum, start_step, loader_state=state.get("data"), stream_changed=stream_changed)
    except ValueError as e:
        raise SystemExit(f"molmo_fast.train: cannot resume {resume_path} exactly: {e}") from None
    report = StepReporter(model, cfg, env, run_dir, start_step, resumed=resume_path is not None)
    if env.is_main and start_step == 0:
        print(f"molmo_fast.train: {env.world_size} rank(s), global batch {cfg.train.global_batch_size} = "
              f"{cfg.train.micro_batch_size} x {grad_accum} accum x {env.world_size}, {cfg.train.max_steps} steps, "
              f"{model.num_parameters(active=True) / 1e6:.1f}M active params, run dir {run_dir}", flush=True)

    tokens_seen = state.get("tokens_seen", 0)
    metrics: dict[str, float] = {}
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        last = step == cfg.train.max_steps
        log_now = step == 1 or _due(step, cfg.train.log_every, last)
        with report.waiting_for_data():
            # The DataLoader draws its base seed from the global RNG when it starts; keep that out of the training
            # stream (dropout) so a resumed run continues the exact RNG sequence of the checkpoint.
            with torch.random.fork_rng(devices=[]):
                micro_batches = data.next_step()
        passes = sampler.passes(step)
        try:
            out = train_step(model, optimizer, by_group, micro_batches, step, cfg, env, want_router=log_now,
                             passes=None if cfg.elastic.is_default else passes)
        except TrainingDiverged as e:
            report.close()
            found = checkpoint_dirs(run_dir)
            keep = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written yet"
            raise TrainingDiverged(f"{e}, {keep}") from None
        steps_done[0] += 1
        tokens_seen += out.tokens
        report.step(micro_batches, out)
        if log_now:
            metrics = report.log(step, out, tokens_seen,
                                 {**data.stats(), **elastic.step_metrics(cfg.elastic, passes, out.pass_losses)})
        if step == start_step + 1 and env.is_main and not (run_dir / "operative_config.gin").exists():
            import gin

            (run_dir / "operative_config.gin").write_text(gin.operative_config_str())
        if _due(step, cfg.train.eval_every, last):
            report.log_eval(step, validate(model, cfg, env, run_dir, step))
        if _due(step, cfg.train.checkpoint_every, last):
            train_state = {"tokens_seen": tokens_seen, "config": config_record(cfg), "data": data.loader.state_dict(),
                           "elastic": sampler.state_dict()}
            ckpt.save_checkpoint(run_dir, step, model, optimizer, train_state, cfg.train.keep_last)
    report.close()
    data.close()
    if cfg.train.export_hf_at_end and start_step < cfg.train.max_steps:
        export_sharded_model(model, run_dir, run_dir / "hf", env.is_main, overwrite=True)
        dist.barrier()
    if env.is_main:
        print(f"molmo_fast.train: wrote {run_dir}/ (metrics.jsonl, tb/, checkpoints/"
              f"{', eval/' if cfg.train.eval_every else ''}{', hf/' if cfg.train.export_hf_at_end else ''})",
              flush=True)
    return metrics
