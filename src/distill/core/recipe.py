"""The recipe: YAML validated by pydantic; each method, task and arch validates its own section.

A recipe names a task, a student, a teacher (another recipe, trained once and cached, or a finished
run folder), a method and training settings. Every error names the key it is about.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_serializer,
                      model_validator)

from distill.core.registry import ARCHS, METHODS, REFS, TASKS, Params, Registry, path_fields
from distill.core.rundir import check_run_name
from distill.errors import MissingFileError, RecipeError, did_you_mean


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # keys added after recipes were first fingerprinted: left out of dumps while unset (None), so
    # recipes that do not use them keep their fingerprints (cached teachers, reuse of finished runs)
    _optional: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset_optional(self, handler: Any) -> Any:
        d = handler(self)
        if isinstance(d, dict):
            for k in self._optional:
                if d.get(k, 0) is None:
                    d.pop(k)
        return d


class EarlyStopping(Strict):
    metric: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(5, ge=1, description="evaluations without improvement before stopping")


class GroupOverride(Strict):
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


class SamplerConfig(Strict):
    """Which training examples each optimizer step draws (``core/sampler.py``); absent: a fresh permutation
    of the training set every epoch. ``domains``: a fixed mixture over the task's domains (``weights``);
    ``ddk``: DDK's mixture (S48), re-weighted every ``every`` steps from the student/teacher perplexity
    ratio per domain on the validation split (``distill.lm.methods.ddk``)."""

    name: Literal["domains", "ddk"]
    weights: dict[str, float] | None = Field(
        None, description="domains: weight per domain name (missing names: 0; default uniform)")
    every: int = Field(50, ge=1, description="optimizer steps per interval (ddk: K, the re-weighting period)")
    smoothing: float = Field(0.5, ge=0, le=1, description="ddk: α of the factor-smooth update (S48 Eq. 2)")
    eval_batches: int | None = Field(
        None, ge=1, description="ddk: validation batches (of train.batch_size) per domain; default all")

    @model_validator(mode="after")
    def _weights(self) -> "SamplerConfig":
        if self.weights is not None:
            if self.name == "ddk":
                raise ValueError("ddk computes the domain weights itself; remove 'weights'")
            if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return self


class TrainConfig(Strict):
    epochs: int = Field(30, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    milestones: list[int] = Field(default_factory=list, description="epochs, for schedule: step")
    gamma: float = Field(0.1, gt=0)
    sharpness: Literal["none", "sam", "tram"] = Field("none", description="sharpness-aware wrapper of the optimizer")
    sam_rho: float = Field(0.05, gt=0)
    tram_noise: float = Field(0.1, gt=0, description="TRAM-x input-noise scale (std, or half-width for uniform)")
    tram_noise_type: Literal["normal", "uniform"] = "normal"
    tram_direction: Literal["gradient", "ones"] | None = Field(
        None, description="TRAM's ε: along the gradient (absent: the paper's SAM step) or the official code's ones")
    tram_scale: float = Field(1.0, gt=0, description="TRAM radius = tram_scale · KL(f(x+z) ‖ f(x))")
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int | Literal["epoch"] = "epoch"
    log_every: int = Field(20, ge=1)
    early_stopping: EarlyStopping | None = None
    groups: dict[str, GroupOverride] = Field(default_factory=dict)
    cache_teacher: bool = Field(True, description="precompute a frozen teacher's logits on the training set once")
    trackers: str | list[str] = Field(
        "auto", description="experiment trackers, by Accelerate's names (tensorboard, wandb, mlflow, comet_ml, aim, "
        "clearml, dvclive, ...): one name or a list, installed by you; auto: tensorboard when installed; none")
    progress: bool = True
    progress_every: float | None = Field(
        None, gt=0, description="seconds between progress lines when stdout is not a terminal (default 30)")
    sampler: SamplerConfig | None = Field(None, description="domain-mixture sampling (default: epoch permutations)")

    _optional: ClassVar[tuple[str, ...]] = ("sampler", "progress_every", "tram_direction")

    @field_validator("trackers")
    @classmethod
    def _trackers(cls, v: str | list[str]) -> str | list[str]:
        """Kept as given (the default serialises as ``auto``, as before); every name must be one Accelerate
        knows and whose package is installed, so a typo or a missing package fails before anything trains."""
        from pydantic_core import PydanticCustomError

        def bad(msg: str) -> PydanticCustomError:
            return PydanticCustomError("trackers", msg.replace("{", "{{").replace("}", "}}"))

        names = [v] if isinstance(v, str) else list(v)
        if not names:
            raise bad("give a tracker name, a list of names, 'auto' or 'none'")
        if len(names) > 1 and {"auto", "none"} & set(names):
            raise bad("'auto' and 'none' stand alone, not in a list")
        if len(set(names)) != len(names):
            raise bad(f"a tracker is named twice in {names}")
        if names[0] in ("auto", "none"):
            return v
        known, available = cls.accelerate_trackers()
        for n in names:
            if n not in known:
                raise bad(f"unknown tracker '{n}'{did_you_mean(n, known)}; Accelerate supports {', '.join(known)} "
                          "(or auto, none)")
            if n not in available:
                raise bad(f"tracker '{n}' is not installed (pip install {n}), or choose another (none: no tracker)")
        return v

    @staticmethod
    def accelerate_trackers() -> tuple[list[str], list[str]]:
        """The tracker names this Accelerate supports, and those whose package is installed."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        return list(LOGGER_TYPE_TO_CLASS), [str(t) for t in get_available_trackers()]

    def tracker_names(self) -> list[str]:
        """The trackers to log with: ``auto`` is tensorboard when installed, ``none`` none."""
        if self.trackers == "none":
            return []
        if self.trackers == "auto":
            return ["tensorboard"] if "tensorboard" in self.accelerate_trackers()[1] else []
        return [self.trackers] if isinstance(self.trackers, str) else list(self.trackers)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_not_false(cls, v: Any) -> Any:
        return "no" if v is False else v  # `--set train.mixed_precision=no`: YAML reads `no` as false


class Component(Strict):
    """A registered name plus its validated parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ModelRef(Strict):
    """A model to start from, exactly one of: ``recipe`` (trained once, cached by fingerprint), ``run``
    (a finished run folder), ``model`` (a model folder, e.g. an HF ``save_pretrained`` directory), or a
    kind a family registers in ``REFS`` (``core/refs.py``; the LM family adds ``merge``, S33 BAI, and,
    for teachers, ``cache``). A registered kind's value is validated by its own schema."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    recipe: str | dict[str, Any] | None = None
    run: str | None = None
    model: str | None = None
    seed: int | Literal["same"] | None = Field(
        None, description="a recipe reference only: train it with this seed; 'same': the seed of the recipe "
        "that holds the reference (a bench then starts each seed from its own init)")

    _core_kinds: ClassVar[tuple[str, ...]] = ("recipe", "run", "model")
    _teacher: ClassVar[bool] = False
    _optional: ClassVar[tuple[str, ...]] = ("model", "seed")

    @model_validator(mode="after")
    def _one(self) -> "ModelRef":
        extra = self.__pydantic_extra__ or {}
        for k in list(extra):
            if k not in REFS or (REFS.get(k).obj.teacher_only and not self._teacher):
                raise ValueError(f"unknown key{did_you_mean(k, self.kinds())}")
            value = extra[k]
            if value is not None:
                extra[k] = TypeAdapter(REFS.get(k).obj.schema).validate_python(value)
        given = [k for k in self._core_kinds if getattr(self, k) is not None]
        given += [k for k, v in extra.items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(repr(k) for k in self.kinds())}; got {given or 'none'}")
        if self.seed is not None and given != ["recipe"]:
            raise ValueError(f"'seed' applies to a 'recipe' reference only, not to '{given[0]}'")
        return self

    @classmethod
    def kinds(cls) -> list[str]:
        return [*cls._core_kinds, *(e.name for e in REFS.entries() if cls._teacher or not e.obj.teacher_only)]

    @property
    def kind(self) -> str:
        """The one kind given (``recipe``, ``run``, ``model`` or a registered kind)."""
        return next(k for k, v in self.items() if v is not None)

    @property
    def value(self) -> Any:
        return dict(self.items())[self.kind]

    def items(self) -> list[tuple[str, Any]]:
        return [*((k, getattr(self, k)) for k in self._core_kinds), *(self.__pydantic_extra__ or {}).items()]


class TeacherRef(ModelRef):
    """The teacher: a ``ModelRef``, or a teacher-only kind (an offline teacher cache, ``cache``)."""

    _teacher: ClassVar[bool] = True


class Stage(Strict):
    """One stage of a staged recipe (S24 AceReason's curricula; ``core/stages.py``): the base recipe with
    ``method`` replaced, ``train`` merged key by key, then the ``set`` overrides (``--set`` syntax)."""

    name: str
    set: list[str] = Field(default_factory=list, description="overrides of the base recipe: key.path=value")
    train: dict[str, Any] = Field(default_factory=dict, description="this stage's train keys (merged into the base's)")
    method: str | dict[str, Any] | None = Field(None, description="this stage's method (replaces the base's)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _run_name(v)


def _run_name(v: str) -> str:
    try:
        return check_run_name(v, "name")
    except RecipeError as err:
        raise ValueError(str(err)) from None


class Recipe(Strict):
    name: str
    seed: int = 0
    task: Component
    student: Component | None = None
    teacher: TeacherRef | None = None
    init: ModelRef | None = Field(None, description="start the student from these weights (its arch is then theirs)")
    method: Component
    train: TrainConfig = Field(default_factory=TrainConfig)
    stages: list[Stage] | None = Field(None, description="train in stages, each from the previous one's student")
    base_dir: str = Field(".", exclude=True, description="folder that relative paths resolve against")

    _optional: ClassVar[tuple[str, ...]] = ("init", "stages")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _run_name(v)

    @model_validator(mode="after")
    def _student_or_init(self) -> "Recipe":
        if self.init is not None and self.student is not None:
            raise ValueError("give either 'student' (a fresh model) or 'init' (start from trained weights), not both")
        if self.stages is not None:
            names = [s.name for s in self.stages]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"stages need distinct names, at least one; got {names}")
        return self


    def resolved(self) -> dict[str, Any]:
        """Every default filled in: what is written to recipe.yaml."""
        return self.model_dump(mode="json", exclude={"base_dir"})

    def fingerprint(self) -> str:
        """Hash of the resolved recipe without its name: equal recipes train equal models."""
        d = self.resolved()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q


# --- loading -------------------------------------------------------------------------------------

_SECTION_KEYS = {"task": "name", "method": "name", "student": "arch"}
_REGISTRIES: dict[str, Registry] = {"task": TASKS, "method": METHODS, "student": ARCHS}


def _format(err: ValidationError, prefix: str, model: type[BaseModel]) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if p not in ("params",))
    key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        last = str(e["loc"][-1])
        fields = _fields_at(model, [str(p) for p in e["loc"][:-1] if p != "params"])
        msg = f"unknown key{did_you_mean(last, fields)}"
    return f"recipe key '{key}': {msg}"


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    for p in path:
        f = model.model_fields.get(p)
        ann = getattr(f, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _absolute(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _validate_component(section: str, raw: Any, registry: Registry, base_dir: Path,
                        cwd_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    key = _SECTION_KEYS[section]
    if isinstance(raw, str):
        raw = {key: raw}
    if not isinstance(raw, dict) or key not in raw:
        raise RecipeError(f"recipe key '{section}': expected a mapping with '{key}'")
    raw = dict(raw)
    name = raw.pop(key)
    entry = registry.get(str(name))
    try:
        params = entry.params.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format(err, section, entry.params)) from None
    values = params.model_dump(mode="json")
    for field in path_fields(entry.params):  # one rule: absolute from here on (recipe.yaml re-runs from anywhere)
        if isinstance(values.get(field), str):
            given_on_cli = f"{section}.{field}" in cwd_keys or section in cwd_keys
            values[field] = _absolute(values[field], Path.cwd() if given_on_cli else base_dir)
    return {"name": entry.name, "params": values}


def params_of(component: Component, registry: Registry) -> Params:
    """The typed parameter model of a validated component."""
    return registry.get(component.name).params.model_validate(component.params)


def method_params(recipe: Recipe) -> Params:
    return params_of(recipe.method, METHODS)


def recipe_from_dict(data: dict[str, Any], base_dir: str | Path = ".", cwd_keys: frozenset[str] = frozenset()) -> Recipe:
    """A validated recipe. Paths in it (``PathField`` parameters, ``teacher``/``init`` folders) are relative
    to ``base_dir`` (a recipe file's folder), except the keys in ``cwd_keys`` (``--set`` overrides), which
    are relative to the working directory; parameter paths are stored absolute."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping")
    data = copy.deepcopy(data)
    for section, registry in _REGISTRIES.items():
        if data.get(section) is not None:
            comp = data[section]
            # accept both the flat form {name: kd, temperature: 2} and the resolved {name, params}
            if isinstance(comp, dict) and set(comp) <= {"name", "params"} and "params" in comp:
                comp = {_SECTION_KEYS[section]: comp["name"], **comp["params"]}
            data[section] = _validate_component(section, comp, registry, Path(base_dir), cwd_keys)
    for required in ("name", "task", "method"):
        if required not in data:
            raise RecipeError(f"recipe key '{required}' is missing")
    data["base_dir"] = str(base_dir)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format(err, "", Recipe)) from None
    for key in _REF_KEYS:  # an inlined teacher/init recipe is valid before anything trains
        ref = getattr(recipe, key)
        if ref is not None and isinstance(ref.recipe, dict):
            try:
                recipe_from_dict(ref.recipe, base_dir=base_dir)
            except RecipeError as err:
                raise RecipeError(f"{key}.recipe: {err}") from None
    if recipe.stages:  # every stage is a valid recipe before anything trains
        stage_recipes(recipe)
    return recipe


def shipped_recipe(name: str) -> Path | None:
    p = resources.files("distill") / "recipes" / f"{name}.yaml"
    return Path(str(p)) if p.is_file() else None


def shipped_recipes() -> list[str]:
    folder = resources.files("distill") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def find_recipe(ref: str, base_dir: str | Path = ".") -> Path:
    """A recipe path (relative to base_dir) or the name of a shipped recipe."""
    p = Path(ref).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    if p.is_file():
        return p
    shipped = shipped_recipe(ref)
    if shipped is not None:
        return shipped
    raise MissingFileError(
        f"recipe '{ref}' not found (no such file, and no shipped recipe of that name"
        f"{did_you_mean(ref, shipped_recipes())}); `distill list` shows the shipped recipes"
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set '{item}': expected key=value, e.g. method.temperature=2")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


_REF_KEYS = ("teacher", "init")
_PATH_KINDS = ("run", "model", "cache")


def _from_cwd(path: list[str], value: Any, cwd: Path) -> Any:
    """A model reference's folder given on the command line (``--set teacher.run=DIR``, ``--set
    'teacher={cache: DIR}'``) is relative to the working directory, not to the recipe file."""
    if path[0] not in _REF_KEYS:
        return value
    if len(path) == 1 and isinstance(value, dict):
        return {k: _from_cwd([path[0], str(k)], v, cwd) for k, v in value.items()}
    if len(path) == 2 and isinstance(value, str):
        p = Path(value).expanduser()
        if path[1] in _PATH_KINDS or (path[1] == "recipe" and (cwd / p).is_file()):  # else a shipped recipe's name
            return str(p if p.is_absolute() else cwd / p)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str], cwd: Path | None = None) -> dict[str, Any]:
    """``data`` with ``key.path=value`` overrides applied; with ``cwd``, model-reference paths in them are
    made absolute against it (command-line paths are relative to the working directory)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        if cwd is not None:
            value = _from_cwd(path, value, cwd)
        node = data
        for k in path[:-1]:
            if isinstance(node.get(k), str) and k in _SECTION_KEYS:  # 'method: kd' shorthand
                node[k] = {_SECTION_KEYS[k]: node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set '{item}': '{k}' is not a mapping")
        node[path[-1]] = value
    return data


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: must be a YAML mapping")
    return data


def flat_sections(d: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe's ``{name, params}`` sections in the flat form (``{name: kd, temperature: 2}``), so
    ``--set`` paths read as in a recipe file."""
    for section, key in _SECTION_KEYS.items():
        comp = d.get(section)
        if isinstance(comp, dict) and "params" in comp:
            d[section] = {key: comp["name"], **comp["params"]}
    return d


def _inline_refs(data: dict[str, Any], overrides: list[str], base_dir: Path) -> dict[str, Any]:
    """``--set teacher.recipe.train.epochs=5`` on a recipe that names its teacher recipe by file: inline
    that recipe (resolved against its own folder) so the override has somewhere to go."""
    paths = [parse_override(o)[0] for o in overrides]
    for key in _REF_KEYS:
        ref = data.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("recipe"), str) and any(
                len(p) > 2 and p[:2] == [key, "recipe"] for p in paths):
            path = find_recipe(ref["recipe"], base_dir)
            inner = recipe_from_dict(_read(path), base_dir=path.parent).resolved()
            data = {**data, key: {**ref, "recipe": flat_sections(inner)}}
    return data


def load_recipe(ref: str | Path, overrides: list[str] | None = None, base_dir: str | Path = ".") -> Recipe:
    path = find_recipe(str(ref), base_dir)
    data = _inline_refs(_read(path), overrides or [], path.parent)
    cwd_keys = frozenset(".".join(parse_override(o)[0][:2]) for o in overrides or [])
    return recipe_from_dict(apply_overrides(data, overrides or [], cwd=Path.cwd()), base_dir=path.parent,
                            cwd_keys=cwd_keys)


# --- staged recipes (run by core/stages.py) -------------------------------------------------------
_UNSET = "<the previous stage's run folder>"  # init.run of stage i > 0 while only validating


def stage_folder(i: int, recipe: Recipe) -> str:
    assert recipe.stages is not None
    return f"{i}-{recipe.stages[i].name}"


def stage_recipe(recipe: Recipe, i: int, start: str | None = None) -> Recipe:
    """Stage ``i`` of ``recipe`` as a plain recipe; ``start`` is stage ``i − 1``'s run folder (absolute)."""
    assert recipe.stages is not None
    stage = recipe.stages[i]
    d: dict[str, Any] = flat_sections(recipe.resolved())
    d.pop("stages", None)
    d["name"] = f"{recipe.name}-{stage.name}"
    if stage.method is not None:
        d["method"] = copy.deepcopy(stage.method)
    d["train"] = {**d["train"], **copy.deepcopy(stage.train)}
    if i > 0:
        if any(item.split("=", 1)[0].strip().split(".")[0] in ("student", "init") for item in stage.set):
            raise RecipeError(f"stages[{i}] '{stage.name}': a later stage starts from the previous stage's student; "
                              "it cannot set 'student' or 'init' (give them to the base recipe, for the first stage)")
        d["student"], d["init"] = None, {"run": start or _UNSET}
    try:
        return recipe_from_dict(apply_overrides(d, stage.set), base_dir=recipe.base_dir)
    except RecipeError as err:
        raise RecipeError(f"stages[{i}] '{stage.name}': {err}") from None


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """Every stage's recipe (stage i > 0 with a placeholder start): validates them all."""
    return [stage_recipe(recipe, i) for i in range(len(recipe.stages or []))]
