"""The diffusers bridge (``distill.diffusion.hf_diffusers``, optional extra ``distill[diffusers]``).

Checked against diffusers itself: the adapter's call is the UNet's call at the mapped timestep; the
(x₀, ε) of our conversions and our DDIM / SDE / consistency updates equal the schedulers' own
``step`` (``pred_original_sample``, ``prev_sample``); the exported folder loads in ``DDIMPipeline``
with the same weights and samples at the student's step count on the student's grid.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from distill.core.refs import load_student
from distill.core.registry import FORMATS
from distill.diffusion import hf_diffusers as H
from distill.diffusion.models import build_denoiser
from distill.diffusion.sampling import sample, step, time_grid
from distill.diffusion.schedules import Schedule, to_x0_eps
from distill.errors import DistillError, MismatchError

T = 1000
COS = Schedule("vp_cosine")


def tiny_unet(num_class_embeds: int | None = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds).eval()


def ddim(prediction: str = "epsilon", **kw) -> diffusers.DDIMScheduler:
    return diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                   prediction_type=prediction, clip_sample=False, **kw)


def cos_time_of_alphabar(abar: float) -> float:
    """Nichol & Dhariwal's ᾱ(t) = cos²((t + s)/(1 + s)·π/2) / f(0) solved for t (independent of the module)."""
    s = 0.008
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (1 + s) * (2 / math.pi) * math.acos(math.sqrt(abar * f0)) - s


def test_adapter_is_the_unet_at_the_noise_matched_timestep():
    unet = tiny_unet()
    model = H.DiffusersDenoiser(unet, ddim("v_prediction"))
    assert model.diffusion == {"schedule": "vp_cosine", "prediction": "v", "sampler": "ddim", "steps": 50,
                               "guidance": 1.0}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 3, 7, 9])
    t = torch.tensor([0.1, 0.35, 0.6, 0.9])
    with torch.no_grad():
        got = model(x, t, y)
        assert torch.equal(got, unet(x, model.timestep(t), class_labels=y).sample)
        # squaredcos_cap_v2: ᾱ_i = ᾱ_cos((i + 1)/T), so t = (i + 1)/T is index i (not t·(T − 1))
        idx = torch.tensor([99, 349, 599, 899])
        assert torch.allclose(model.timestep((idx + 1) / T), idx.float(), atol=2e-3)
        ref = unet(x, idx, class_labels=y).sample
        assert torch.allclose(model(x, (idx + 1) / T, y), ref, atol=1e-4)
        assert not torch.allclose(model(x, idx / (T - 1), y), ref, atol=1e-4)  # the t·(T−1) map is another input
    # flow matching: σ = t, timestep = t·T
    flow = H.DiffusersDenoiser(unet, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0))
    assert flow.diffusion["schedule"] == "flow" and flow.diffusion["prediction"] == "velocity"
    assert torch.allclose(flow.timestep(t), t * T)


def test_other_beta_schedules_map_by_noise_level():
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    model = H.DiffusersDenoiser(tiny_unet(None), sched)
    assert model.diffusion["sampler"] == "sde" and model.num_classes == 0
    for i in (10, 250, 600, 950):
        t = cos_time_of_alphabar(float(sched.alphas_cumprod[i]))
        assert abs(float(model.timestep(torch.tensor([t]))) - i) < 1e-2
    with pytest.raises(DistillError, match="not supported"):
        H.DiffusersDenoiser(tiny_unet(None), diffusers.PNDMScheduler())


@pytest.mark.parametrize("prediction,kind", [("epsilon", "eps"), ("v_prediction", "v")])
def test_x0_eps_and_ddim_step_equal_the_schedulers(prediction, kind):
    sched = ddim(prediction)
    sched.set_timesteps(10)  # steps of T/10 indices
    g = torch.Generator().manual_seed(1)
    x, pred = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    for i in (899, 499, 199):
        out = sched.step(pred, i, x, eta=0.0)
        t = torch.full((3,), (i + 1) / T)
        x0, _ = to_x0_eps(pred, kind, x, t, COS)
        assert torch.allclose(x0, out.pred_original_sample, atol=1e-4, rtol=1e-4)
    # one DDIM step of the adapter (our sampler) against the scheduler's step on the UNet's output
    unet = tiny_unet()
    model = H.DiffusersDenoiser(unet, sched)
    y = torch.tensor([1, 2, 5])
    with torch.no_grad():
        for i in (899, 499):
            ours = step(model, COS, "ddim", x, torch.tensor((i + 1) / T), torch.tensor((i + 1 - 100) / T), y, 1.0, 10)
            theirs = sched.step(unet(x, i, class_labels=y).sample, i, x, eta=0.0).prev_sample
            assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler,pipeline,scheduler", [("ddim", "DDIMPipeline", "DDIMScheduler"),
                                                        ("sde", "DDPMPipeline", "DDPMScheduler"),
                                                        ("consistency", "DDPMPipeline", "LCMScheduler")])
def test_export_round_trip_samples_like_the_student(tmp_path, sampler, pipeline, scheduler):
    unet = tiny_unet(seed=2)
    student = H.DiffusersDenoiser(unet, ddim("v_prediction"), steps=4, sampler=sampler)
    folder = H.save_pipeline(tmp_path / "pipe", student)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == pipeline and index["scheduler"] == ["diffusers", scheduler]
    pipe = diffusers.DDIMPipeline.from_pretrained(str(folder))  # what the brief promises loads
    sd, sd2 = unet.state_dict(), pipe.unet.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the exported scheduler, run as its pipeline runs it, at the student's step count = the student's sampling
    own = getattr(diffusers, pipeline).from_pretrained(str(folder))
    own.scheduler.set_timesteps(4)
    assert own.scheduler.timesteps.tolist() == [999, 749, 499, 249]  # t = 1, 3/4, 1/2, 1/4: our time_grid(4)
    g = torch.Generator().manual_seed(3)
    noise, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])
    x = noise.clone()
    g.manual_seed(4)
    with torch.no_grad():
        for ts in own.scheduler.timesteps:
            x = own.scheduler.step(own.unet(x, ts, class_labels=y).sample, ts, x, generator=g).prev_sample
    g.manual_seed(4)
    ours = sample(student, noise, y, times=time_grid(4), generator=g)
    assert torch.allclose(ours, x, atol=1e-3), (ours - x).abs().max()
    # the folder reloads as the same denoiser, with the student's settings
    back = H.load_diffusers_unet(folder)
    assert back.diffusion == student.diffusion and back.saved_config["shape"] == [1, 8, 8]
    with torch.no_grad():
        t = torch.full((4,), 0.4)
        assert torch.equal(back(noise, t, y), student(noise, t, y))


def test_exported_unconditional_pipeline_runs_as_is(tmp_path):
    unet = tiny_unet(None, seed=6)
    student = H.DiffusersDenoiser(unet, ddim("v_prediction"), steps=4)
    folder = H.save_pipeline(tmp_path / "pipe", student)
    call = json.loads((folder / "distill.json").read_text())["call"]
    pipe = diffusers.DDIMPipeline.from_pretrained(str(folder))
    g = torch.Generator().manual_seed(7)
    out = pipe(batch_size=2, generator=g, output_type="np", **call).images
    g.manual_seed(7)
    noise = torch.randn(2, 1, 8, 8, generator=g)  # DDIMPipeline's first draw
    ours = sample(student, noise, times=time_grid(4))
    expect = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # the pipeline's image post-processing
    assert ((expect > 0.01) & (expect < 0.99)).mean() > 0.5  # not all clipped
    assert out.shape == (2, 8, 8, 1) and abs(out - expect).max() < 1e-3


def test_native_denoiser_is_not_exported(tmp_path):
    mlp = build_denoiser("mlp_denoiser", {"hidden": 16, "depth": 1}, (2,), 0)
    with pytest.raises(DistillError, match="needs a diffusers UNet2DModel student") as err:
        H.save_pipeline(tmp_path / "x", mlp)
    assert "\n" not in str(err.value)
    with pytest.raises(DistillError, match="FlowMatchEulerDiscreteScheduler"):
        H.save_pipeline(tmp_path / "y", H.DiffusersDenoiser(tiny_unet(), diffusers.FlowMatchEulerDiscreteScheduler()))


def test_format_claims_diffusers_folders_and_refuses_foreign_ones(tmp_path):
    fmt = FORMATS.get("diffusers").obj
    folder = H.save_pipeline(tmp_path / "pipe", H.DiffusersDenoiser(tiny_unet(), ddim(), steps=4))
    assert fmt.claims(json.loads((folder / "model_index.json").read_text()))
    assert fmt.claims(json.loads((folder / "unet" / "config.json").read_text()))
    assert H.is_diffusers_folder(folder) and H.is_diffusers_folder(folder / "unet")
    for foreign in ({"format": "distill-diffusion-v1"}, {"model_type": "gpt2"}, {"format": "distill-student-v1"}):
        assert not fmt.claims(foreign)
    # a UNet folder goes through core's load_student (config.json), its scheduler from ../scheduler
    model = load_student(folder / "unet")
    assert isinstance(model, H.DiffusersDenoiser) and model.diffusion["steps"] == 4 and model.num_classes == 10
    H.check_task(model, (1, 8, 8), 10, folder)  # digits-diffusion
    with pytest.raises(MismatchError, match="the task has"):
        H.check_task(model, (2,), 0, folder)  # ring8
    # foreign folders: one line each
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "config.json").write_text(json.dumps({"format": "distill-diffusion-v1"}))
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiTPipeline", "_diffusers_version": "0.30.0", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    for bad, what in (("distill", "distill-diffusion-v1"), ("dit", "DiTPipeline")):
        assert not H.is_diffusers_folder(tmp_path / bad)
        with pytest.raises(MismatchError, match=what) as err:
            H.load_diffusers_unet(tmp_path / bad)
        assert "\n" not in str(err.value)
    # labels the UNet has no embedding for (CFG's null label on num_class_embeds = num_classes)
    with pytest.raises(MismatchError, match="null label"):
        model(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([10, 10]))
    with pytest.raises(MismatchError, match="num_class_embeds"):
        H.DiffusersDenoiser(tiny_unet(), ddim(), num_classes=4)


def test_condition_model_takes_labels_as_hidden_states():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=2,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    model = H.DiffusersDenoiser(unet, ddim(), num_classes=3)
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        ref = unet(x, model.timestep(t), encoder_hidden_states=model.label(y)[:, None]).sample
        assert torch.equal(model(x, t, y), ref)
        null = unet(x, model.timestep(t), encoder_hidden_states=model.label(torch.tensor([3, 3]))[:, None]).sample
        assert torch.equal(model(x, t), null)  # no labels: the null row
        enc = H.DiffusersDenoiser(unet, ddim(), encode=lambda c: torch.ones(len(c), 2, 8))
        assert torch.equal(enc(x, t, y), unet(x, model.timestep(t), encoder_hidden_states=torch.ones(2, 2, 8)).sample)


# --- the task hook in distill.diffusion.data.tasks -----------------------------------------------------
def test_a_diffusers_pipeline_serves_a_diffusion_task(tmp_path):
    from distill.core.recipe import recipe_from_dict
    from distill.core.runner import run_recipe

    unet = tiny_unet(seed=5)
    folder = H.save_pipeline(tmp_path / "pipe", H.DiffusersDenoiser(unet, ddim("v_prediction")))
    task = {"name": "digits-diffusion", "num_eval": 50}
    naive = {"name": "naive-diffusers", "seed": 0, "task": task, "init": {"model": str(folder)},
             "method": {"name": "naive", "steps": 2, "sampler": "ddim"},
             "train": {"epochs": 1, "max_steps": 1, "batch_size": 32, "optimizer": "adam", "lr": 0.1,
                       "weight_decay": 0.0}}
    run = run_recipe(recipe_from_dict(naive), out=tmp_path / "runs")
    assert run.metrics["test/nfe"] == 2 and run.metrics["test/steps"] == 2
    saved = run.run_dir / "student"
    assert (saved / "model_index.json").is_file() and (saved / "samples.png").is_file()
    back = diffusers.DDIMPipeline.from_pretrained(str(saved)).unet.state_dict()
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())  # naive: untouched weights
    assert json.loads((saved / "distill.json").read_text())["diffusion"]["steps"] == 2
    # as a teacher of a task it does not fit: one line
    bad = {**naive, "name": "ring", "task": {"name": "ring8"}, "init": None, "teacher": {"model": str(folder)},
           "student": {"arch": "mlp_denoiser", "hidden": 16, "depth": 1}}
    with pytest.raises(MismatchError, match="the task has"):
        run_recipe(recipe_from_dict(bad), out=tmp_path / "runs")
