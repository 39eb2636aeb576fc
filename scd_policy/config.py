"""Typed configuration: one source of truth for every window, offset and size.

The dataclasses here are the schema; the YAML files under the top-level ``configs/`` folder are
the values (size presets, per-policy defaults). Hydra composes the YAML onto these schemas, and
``OmegaConf.to_object`` turns the result into the dataclasses below, which runs
``__post_init__`` and therefore every validation rule.

Derived values (time offsets the dataset loads, input shapes) are computed here or filled in from
the dataset at training time; they are never written by hand in a YAML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

POLICY_TYPES = ("scd", "causal_diffusion", "diffusion_policy")
CAUSAL_POLICY_TYPES = ("scd", "causal_diffusion")
DIFFUSION_PROCESSES = ("flow", "ddpm", "regression")
SAMPLERS = {"flow": ("euler",), "ddpm": ("ddpm", "ddim"), "regression": ("direct",)}


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DiffusionConfig:
    """The noising process and its sampler; lives apart from the networks."""

    # "flow": flow matching (velocity eps - x0); "ddpm": epsilon prediction; "regression": no noise at
    # all, the same network predicts the chunk itself in one call (MSE to the chunk) — the ablation that
    # shows what diffusion buys on multimodal tasks (a regressor averages the modes).
    process: str = "flow"
    sampler: str = "euler"  # flow: "euler"; ddpm: "ddpm" or "ddim"; regression: "direct" (set for you)
    num_inference_steps: int = 10  # K: denoising steps per replan (may be changed at inference)
    num_train_timesteps: int = 100  # ddpm only: length of the discrete noise schedule
    beta_schedule: str = "squaredcos_cap_v2"  # ddpm only
    clip_sample: bool = True  # ddpm only: clamp the predicted x0 to [-1, 1]
    logit_normal_mean: float = 0.0  # flow only: t ~ sigmoid(N(mean, std))
    logit_normal_std: float = 1.0
    # Few-step sampling (flow, scd only): a shortcut model (Frans et al. 2024). The denoiser is also
    # told the step size d it takes and learns, besides flow matching (d = 0), that one step of 2d
    # lands where two of d do (self-consistency), for d from 2^-shortcut_levels up to 1/2, so that
    # K = 1, 2, 4, ... Euler steps of size 1/K sample the same distribution. Train from scratch, or
    # fine-tune a trained scd decoder with its encoder frozen (train.init_from, train.freeze): a
    # distillation that costs only decoder passes.
    shortcut: bool = False
    shortcut_levels: int = 7  # the smallest step trained is 2^-levels (1/128)
    shortcut_fraction: float = 0.25  # share of each batch's chunks trained on self-consistency

    def __post_init__(self) -> None:
        if self.process == "regression" and self.sampler == "euler":  # the default: its only sampler
            self.sampler = "direct"
        _require(
            self.process in DIFFUSION_PROCESSES,
            f"diffusion.process={self.process!r}; expected one of {DIFFUSION_PROCESSES}",
        )
        _require(
            self.sampler in SAMPLERS[self.process],
            f"diffusion.sampler={self.sampler!r} does not fit process {self.process!r}; "
            f"expected one of {SAMPLERS[self.process]}",
        )
        _require(self.num_inference_steps >= 1, "diffusion.num_inference_steps must be >= 1")
        _require(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps must be >= 2")
        if self.process == "ddpm":
            _require(
                self.num_inference_steps <= self.num_train_timesteps,
                f"diffusion.num_inference_steps={self.num_inference_steps} exceeds "
                f"num_train_timesteps={self.num_train_timesteps}",
            )
        _require(self.logit_normal_std > 0, "diffusion.logit_normal_std must be > 0")
        if self.shortcut:
            _require(
                self.process == "flow",
                f"diffusion.shortcut=true needs process=flow (a step-size-conditioned velocity); got "
                f"process={self.process!r}",
            )
        _require(
            1 <= self.shortcut_levels <= 12,
            f"diffusion.shortcut_levels={self.shortcut_levels} not in [1, 12]",
        )
        _require(
            0.0 < self.shortcut_fraction < 1.0,
            f"diffusion.shortcut_fraction={self.shortcut_fraction} must be in (0, 1)",
        )


@dataclass
class PolicyConfig:
    """Architecture and time layout of a policy.

    Time layout. For the causal policies (``scd``, ``causal_diffusion``) the action chunk predicted at
    control step t covers steps ``t .. t+horizon-1``; training samples are trajectory windows of
    ``train_window`` steps. For ``diffusion_policy`` (Chi et al. convention) the model sees the last
    ``n_obs_steps`` observations and the chunk starts ``n_obs_steps - 1`` steps in the past.
    """

    type: str = "scd"
    horizon: int = 16  # H: actions per predicted chunk
    n_action_steps: int = 8  # actions executed open-loop from each chunk
    n_obs_steps: int = 2  # diffusion_policy: observation window; causal policies ignore it
    # W: steps per training trajectory window (causal policies), and by default the run-time history.
    # Short by default, like diffusion_policy's n_obs_steps (why: docs/RESULTS.md, "history window");
    # a task that needs memory declares it (TaskSpec.history_steps) and gets a longer one.
    train_window: int = 2
    # Steps kept in the run-time KV cache before the oldest is evicted; 0: train_window. Longer than
    # train_window means attending further back than training ever did (a warning says so).
    context_window: int = 0

    # Network width and depth. SCD: encoder_layers run once per step, decoder_layers K times, so the
    # decoder's depth sets SCD's speed-up over the baselines (measured: docs/RESULTS.md, "Headline").
    # causal_diffusion / diffusion_policy: one stack of encoder_layers + decoder_layers layers.
    d_model: int = 256
    n_heads: int = 4
    encoder_layers: int = 7
    decoder_layers: int = 1
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    n_context_tokens: int = 4  # tokens of c_t handed from the encoder to the decoder
    image_tokens: int = 4  # tokens per camera from the conv image encoder
    image_channels: list[int] = field(default_factory=lambda: [32, 64, 128])

    # Training recipe (SCD paper, adapted).
    decoder_repeats: int = 2  # R: noise draws per encoder pass
    # Causal policies, training only: how many of a window's steps have their chunk denoised per
    # encoder pass (a random subset, the same for the whole batch); 0: every step. With long windows the
    # denoiser, not the encoder, dominates a training step (W x R chunks per window): a subset keeps
    # every step's history in the encoder pass at a fraction of the cost.
    decoder_steps: int = 0
    context_noise: float = 0.05  # std of Gaussian noise added to c_t in training
    history_noise: float = 0.0  # std of noise added to normalised history inputs in training
    # Causal policies, training only: probability of hiding a step's previous action (the "no previous
    # action" token of an episode start), against copying the last action instead of reading the scene
    # (the evidence for the default: docs/RESULTS.md).
    prev_action_dropout: float = 0.5
    # Causal policies: whether the encoder reads each step's previous action at all (one token per
    # step). False removes the copying shortcut outright; with ``past_actions`` the policy must then
    # recover the past actions from the observation history (past-token prediction as Torne et al.
    # 2025 run it: their policies see observations only).
    prev_action_input: bool = True
    # Causal policies: past-token prediction (Torne et al. 2025, against copycat on long histories).
    # Every step's chunk also predicts the P actions before it: its ``horizon`` actions start P steps
    # back (``chunk_start_offset = -P``), so the decoder must read the past from the context rather than
    # copy it; at run time those P are dropped, as diffusion_policy's past actions are.
    past_actions: int = 0
    # SCD, training only: random history lengths. Each step of a training window, with this
    # probability, attends only to a uniformly drawn number of the steps before it (0 .. all; the
    # encoder's attention mask, at every layer), so the policy must act from any amount of history,
    # not lean on a long one. The run-time window is unchanged.
    random_history: float = 0.0
    decoder_lr_scale: float = 2.0  # decoder lr = scale * encoder lr

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    # Filled from the dataset when a policy is built; never written by hand.
    # key -> shape of one step, e.g. {"state": [10], "image": [3, 96, 96]} (images are CHW).
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    action_dim: int = 0

    def __post_init__(self) -> None:
        _require(self.type in POLICY_TYPES, f"policy.type={self.type!r}; expected one of {POLICY_TYPES}")
        if self.context_window == 0:
            self.context_window = self.train_window
        for name in ("horizon", "n_action_steps", "n_obs_steps", "train_window", "context_window"):
            _require(getattr(self, name) >= 1, f"policy.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("d_model", "n_heads", "n_context_tokens", "image_tokens"):
            _require(getattr(self, name) >= 1, f"policy.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.encoder_layers >= 1, "policy.encoder_layers must be >= 1")
        _require(self.decoder_layers >= 1, "policy.decoder_layers must be >= 1")
        _require(
            self.d_model % self.n_heads == 0,
            f"policy.d_model={self.d_model} must be divisible by n_heads={self.n_heads}",
        )
        _require(
            (self.d_model // self.n_heads) % 2 == 0, "policy.d_model / n_heads must be even (RoPE pairs)"
        )
        _require(
            0 <= self.past_actions < self.horizon,
            f"policy.past_actions={self.past_actions} must be in [0, horizon={self.horizon})",
        )
        max_exec = self.horizon + self.chunk_start_offset
        _require(
            self.n_action_steps <= max_exec,
            f"policy.n_action_steps={self.n_action_steps} must be <= horizon - n_obs_steps + 1 = {max_exec}"
            if self.type == "diffusion_policy"
            else f"policy.n_action_steps={self.n_action_steps} must be <= horizon={self.horizon}"
            + (f" - past_actions={self.past_actions}" if self.past_actions else ""),
        )
        if self.is_causal:
            _require(
                self.context_window >= self.train_window,
                f"policy.context_window={self.context_window} must be >= train_window={self.train_window}",
            )
        _require(self.decoder_repeats >= 1, "policy.decoder_repeats must be >= 1")
        _require(
            0 <= self.decoder_steps <= self.train_window,
            f"policy.decoder_steps={self.decoder_steps} must be in [0, train_window={self.train_window}] "
            "(0: every step of the window)",
        )
        _require(self.context_noise >= 0 and self.history_noise >= 0, "noise levels must be >= 0")
        _require(
            0.0 <= self.random_history <= 1.0 and (self.random_history == 0 or self.type == "scd"),
            f"policy.random_history={self.random_history} must be in [0, 1] (and is scd's lever only; "
            f"this policy is {self.type})",
        )
        _require(
            0.0 <= self.prev_action_dropout < 1.0,
            f"policy.prev_action_dropout={self.prev_action_dropout} must be in [0, 1)",
        )
        _require(self.decoder_lr_scale > 0, "policy.decoder_lr_scale must be > 0")
        _require(0.0 <= self.dropout < 1.0, "policy.dropout must be in [0, 1)")
        _require(len(self.image_channels) >= 1, "policy.image_channels must list at least one width")
        if isinstance(self.diffusion, dict):  # built from a plain dict (e.g. a checkpoint's JSON)
            self.diffusion = DiffusionConfig(**self.diffusion)
        _require(
            not self.diffusion.shortcut or self.type == "scd",
            f"diffusion.shortcut=true (few-step decoding) is built for policy.type=scd only, got "
            f"{self.type!r}: its small decoder is what a shortcut model retrains",
        )

    @property
    def is_causal(self) -> bool:
        return self.type in CAUSAL_POLICY_TYPES

    @property
    def chunk_start_offset(self) -> int:
        """Offset of the chunk's first action relative to the current control step."""
        return -self.past_actions if self.is_causal else -(self.n_obs_steps - 1)

    @property
    def observation_offsets(self) -> list[int]:
        """Time offsets, relative to a sample's anchor step, of the observations a sample holds."""
        if self.is_causal:
            return list(range(self.train_window))
        return list(range(-(self.n_obs_steps - 1), 1))

    @property
    def action_offsets(self) -> list[int]:
        """Time offsets of the actions a sample holds.

        Causal policies: offset -1 is the action executed before the window's first step (fed to the
        encoder as the "previous action" token), followed by every action any step of the window
        needs for its chunk: ``train_window + horizon - 1`` more; with ``past_actions`` = P > 1 they
        start at -P (the first step's chunk reaches P steps back).
        diffusion_policy: the ``horizon`` actions of the chunk.
        """
        if self.is_causal:
            return list(range(-max(self.past_actions, 1), self.train_window + self.horizon - 1))
        start = self.chunk_start_offset
        return list(range(start, start + self.horizon))


@dataclass
class DataConfig:
    """Which dataset to read and how to split it."""

    path: str = ""  # a replay buffer (.zarr directory)
    obs_keys: list[str] = field(default_factory=lambda: ["state"])  # observation keys the policy reads
    action_key: str = "action"
    val_ratio: float = 0.1  # fraction of episodes held out (at least one when there are >= 2)
    split_seed: int = 0
    max_train_episodes: int | None = None  # cap for data-scaling studies

    def __post_init__(self) -> None:
        _require(0.0 <= self.val_ratio < 1.0, f"data.val_ratio={self.val_ratio} must be in [0, 1)")
        _require(len(self.obs_keys) >= 1, "data.obs_keys must name at least one observation key")
        _require(self.action_key not in self.obs_keys, "data.action_key must not be an observation key")
        _require(
            self.max_train_episodes is None or self.max_train_episodes >= 1,
            "data.max_train_episodes must be >= 1 (or null for all)",
        )


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 20_000
    batch_size: int = 64
    lr: float = 3e-4  # encoder lr; the decoder gets policy.decoder_lr_scale times this
    weight_decay: float = 1e-2
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    num_workers: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available else cpu
    amp: bool = True  # mixed precision on CUDA only
    log_every: int = 50
    val_every: int = 1000
    eval_every: int = 0  # rollout evaluation period in steps (0: only at the end)
    checkpoint_every: int = 1000
    resume: bool = False
    # Start from another run's weights (its run folder or a policy folder) instead of a fresh network:
    # fine-tuning and distillation. Tensors the new config adds (a shortcut decoder's step embedding)
    # keep their initial values; anything else that differs is refused.
    init_from: str = ""
    # Parameter-name prefixes that are not trained (e.g. [encoder., tokenizer.] to distil scd's decoder
    # on a frozen encoder); their EMA copy stays equal to them.
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "val_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, "train.lr must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _require(self.grad_clip > 0, "train.grad_clip must be > 0")
        _require(0.0 <= self.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
        _require(self.num_workers >= 0 and self.eval_every >= 0, "train.num_workers/eval_every must be >= 0")
        _require(self.num_threads is None or self.num_threads >= 1, "train.num_threads must be >= 1 or null")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"train.device={self.device!r}; expected 'auto', 'cpu' or 'cuda[:N]'",
        )


@dataclass
class EvalConfig:
    """Rollout evaluation in the task's simulator."""

    episodes: int = 50
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fixed seed list; episodes per seed
    n_envs: int = 2  # parallel environments (subprocesses)
    max_steps: int | None = None  # None: the task's own episode limit
    num_inference_steps: int | None = None  # override K at inference
    n_action_steps: int | None = None  # override the open-loop execution length
    # Execution (scd_policy.execution): replan at every tick with temporal ensembling; the latency
    # budget in ticks (a chunk planned at tick t is used from t + latency_ticks on: an injected delay);
    # how the next chunk takes over in open loop ("switch" or "blend").
    replan_every_step: bool = False
    latency_ticks: int = 0
    seam: str = "switch"
    # The steps a causal policy attends to at run time (None: its own policy.context_window): a
    # shorter history than the one it was trained with, to ask how much of it a policy uses. The
    # windowed baseline sees n_obs_steps and ignores it.
    context_window: int | None = None
    videos: int = 2  # episodes recorded as mp4 (0: none)
    video_size: int = 128

    def __post_init__(self) -> None:
        _require(self.episodes >= 1, "eval.episodes must be >= 1")
        _require(len(self.seeds) >= 1, "eval.seeds must list at least one seed")
        _require(self.n_envs >= 1, "eval.n_envs must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "eval.max_steps must be >= 1")
        _require(self.videos >= 0 and self.video_size >= 16, "eval.videos >= 0 and eval.video_size >= 16")
        _require(self.latency_ticks >= 0, "eval.latency_ticks must be >= 0")
        _require(
            self.context_window is None or self.context_window >= 1,
            f"eval.context_window={self.context_window}: expected >= 1 steps, or null for the policy's own",
        )
        _require(
            self.seam in ("switch", "blend", "inpaint"),
            f"eval.seam={self.seam!r}: expected switch, blend or inpaint",
        )


@dataclass
class ExperimentConfig:
    """The whole run: what ``scd-train`` composes and a checkpoint stores (resolved)."""

    # The task of the rollouts: a registered name (envs.registry), gym:<id> or <module>:<factory>
    # (docs/tasks.md); training alone does not need one.
    task: str = ""
    task_module: str | None = None  # a module that registers the task (imported first; see docs/tasks.md)
    dataset: str = ""  # the replay buffer to train on; configs/train.yaml routes it into data.path
    out: str = "runs/default"  # the run folder: checkpoints, logs, evaluation results
    camera: str | None = None  # image policies: the camera the data was collected with (from its card)
    # Image keys other than `image` -> the camera that renders each in rollouts (from the dataset card;
    # a key named after a camera, image_<camera>, needs no entry).
    cameras: dict[str, str] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def config_dir() -> Path:
    """The folder holding the Hydra YAML configs, from a checkout or from an installed wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "configs", package_dir.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no Hydra config folder found next to {package_dir} (looked for 'configs' inside the package and "
        "at the repository root); reinstall scd-policy"
    )


def policy_config_from_dict(values: dict[str, Any]) -> PolicyConfig:
    """Build a validated PolicyConfig from plain data (e.g. a checkpoint's JSON); unknown keys raise."""
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"unknown policy config keys {unknown}; known keys: {sorted(known)}")
    values = dict(values)
    if isinstance(values.get("diffusion"), dict):
        values["diffusion"] = DiffusionConfig(**values["diffusion"])
    return PolicyConfig(**values)


def task_spec(name: str, module: str | None = None) -> Any:
    """The task ``name`` (an ``envs.registry.TaskSpec``), after importing ``module`` (a ``task_module=``
    that registers it); an unknown or unbuildable one is a ``ConfigError`` naming it and the fix."""
    from envs.external import ExternalTaskError
    from envs.registry import get_task, import_task_modules

    try:
        import_task_modules([module] if module else [])
        return get_task(name)
    except KeyError as error:
        raise ConfigError(f"task={name!r}: {error.args[0]}") from None
    except ExternalTaskError as error:
        raise ConfigError(str(error)) from None


def resolve_config(cfg: DictConfig, schema: type[T]) -> T:
    """A composed config resolved into its typed dataclass (``__post_init__`` validation runs);
    any bad value raises ``ConfigError`` naming it."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (ConfigError, OmegaConfBaseException) as error:
        raise ConfigError(str(error)) from None
    if not isinstance(obj, schema):
        raise ConfigError(f"expected a {schema.__name__}, got {type(obj).__name__}")
    return obj


def register_configs() -> None:
    """Register the schemas with Hydra so YAML files are type-checked against them."""
    cs = ConfigStore.instance()
    cs.store(name="experiment_schema", node=ExperimentConfig)
    cs.store(group="policy", name="policy_schema", node=PolicyConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
