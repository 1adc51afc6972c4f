"""Tests of prism.py with tiny, randomly initialised real components (no download, CPU only).

Run:  python -m pytest -q test_prism.py
"""
import copy
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import prism

HERE = Path(__file__).parent
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
NAMES = ["mouse", "crane", "kite", "tank"]
SAMPLE = dict(num_steps=10, guidance_start=0.0, guidance_end=1.0, guidance_every=1)  # guide every step


# ── fixtures: tiny real models, built once ──────────────────────────────────────────────────
@pytest.fixture(scope="session")
def pipe_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline saved with save_pretrained (ε-prediction, DDIM)."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    prism.random_pipeline(folder / "vocab").save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture()
def pipe(pipe_dir):
    """Loaded through the same from_pretrained path as a real model, fresh for every test."""
    return prism.load_diffusion_pipeline(pipe_dir, "cpu")


@pytest.fixture(scope="session")
def teacher():
    """A tiny random CNN teacher whose last layer is scaled up, so its logits (and the energy
    differences that guidance makes) are well above float noise."""
    model = prism.build_tiny_classifier(len(NAMES)).eval().requires_grad_(False)
    with torch.no_grad():
        model[1][-1].weight.mul_(30)
    return model


def latents(count, seed=0, size=16):
    return prism.initial_latents(range(seed, seed + count), (4, size, size))


PROMPTS = [f"a photo of a {name}" for name in NAMES]


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART I — THE METHOD: equations, prompts, guided sampling, distillation, precision and recall
# ══════════════════════════════════════════════════════════════════════════════════════════


# ── §1 energy and §4 KD loss against direct re-computation ──────────────────────────────────
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_teacher_energy_is_minus_tau_log_sum_exp(temperature):
    logits = torch.randn(6, 10, dtype=torch.float64) * 3
    direct = -temperature * torch.log(torch.exp(logits / temperature).sum(dim=1))
    torch.testing.assert_close(prism.teacher_energy(logits, temperature), direct)


def test_kd_loss_is_tau_squared_kl_teacher_to_student():
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    tau = 3.0
    p_t, p_s = torch.softmax(teacher / tau, 1), torch.softmax(student / tau, 1)
    direct = tau ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(prism.kd_loss(student, teacher, tau), direct)
    assert prism.kd_loss(teacher, teacher, tau).abs() < 1e-6


def test_guidance_loss_combines_energy_and_cross_entropy():
    logits, ids = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    ce = -torch.log_softmax(logits, 1)[torch.arange(4), ids]
    expected = 0.7 * prism.teacher_energy(logits, 2.0) + 0.2 * ce
    torch.testing.assert_close(prism.guidance_loss(logits, ids, energy_scale=0.7, class_scale=0.2, temperature=2.0),
                               expected)


# ── §3 prompts ───────────────────────────────────────────────────────────────────────────────
def split_prompt(prompt, subject):
    """(style, scene) of a prompt "{style} of {subject}, {scene}"."""
    style, rest = prompt.split(" of ", 1)
    assert rest.startswith(subject), (prompt, subject)
    return style, rest[len(subject):].removeprefix(", ")


def with_article(name):
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def test_imagenet_prompts_deterministic_named_and_each_scene_a_built_in_phrase():
    names, _ = prism.load_class_names("imagenet")
    prompts, classes = prism.build_prompts(names, 5, seed=0)
    assert prompts == prism.build_prompts(names, 5, seed=0)[0]
    assert prompts != prism.build_prompts(names, 5, seed=1)[0]
    assert len(prompts) == 1000 and all(len(set(class_prompts)) == 5 for class_prompts in prompts)
    for name, entry, class_prompts in zip(names, classes, prompts):
        assert (entry["source"], entry["scene_source"]) == ("name", "built-in")
        assert entry["prompts"] == class_prompts
        assert entry["scenes"] == list(prism.SCENES)  # no built-in scene names an ImageNet class
        for prompt in class_prompts:  # "{style} of a {name}, {scene}": one phrase of one list
            style, scene = split_prompt(prompt, with_article(name))
            assert style in prism.PHOTO_STYLES + prism.OTHER_STYLES and scene in prism.SCENES


def test_photo_share_picks_styles_and_a_prompt_repeats_only_after_every_style_scene_pair():
    pairs = len(prism.PHOTO_STYLES) * len(prism.SCENES)
    prompts = prism.build_prompts(NAMES[:1], pairs + 3, photo_share=1.0)[0][0]
    assert len(set(prompts[:pairs])) == pairs and set(prompts[pairs:]) <= set(prompts[:pairs])
    assert all(p.split(" of ")[0] in prism.PHOTO_STYLES for p in prompts)
    others, _ = prism.build_prompts(NAMES, 20, photo_share=0.0)
    assert all(p.split(" of ")[0] in prism.OTHER_STYLES for ps in others for p in ps)


def head_teacher():
    """A teacher whose last linear layer decides the neighbours: rows 0 and 2 nearly parallel."""
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.2, 1.0]])
    linear = nn.Linear(3, 4)
    linear.weight.data.copy_(weight)
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(3), linear), weight


def test_teacher_neighbours_are_the_nearest_head_rows_and_a_file_describes_a_class():
    teacher, weight = head_teacher()
    unit = torch.nn.functional.normalize(weight, dim=1)
    prompts, classes = prism.build_prompts(NAMES, 6, teacher=teacher, neighbours=1)
    assert [e["neighbours"] for e in classes] == [
        [NAMES[j]] for j in (unit @ unit.T).fill_diagonal_(-2).argmax(1)]
    assert classes[0]["neighbours"] == ["kite"] and classes[2]["neighbours"] == ["mouse"]
    for entry, class_prompts in zip(classes, prompts):  # without an LLM: no description
        assert (entry["description"], entry["source"]) == ("", "name")
        assert not any(prism.names_any(p, entry["neighbours"]) for p in class_prompts)
    assert all(len(e["neighbours"]) == 3 for e in prism.build_prompts(NAMES, 1, teacher=teacher,
                                                                      neighbours=9)[1])
    assert all(e["neighbours"] == [] for e in prism.build_prompts(  # not this teacher's classes
        NAMES[:3], 1, teacher=teacher, neighbours=1)[1])
    described, classes = prism.build_prompts(NAMES, 3, teacher=teacher, neighbours=1,
                                             descriptions=["a small rodent", "", "", ""])
    assert all(p.split(" of ", 1)[1].startswith("a mouse, a small rodent, ") for p in described[0])
    assert [e["source"] for e in classes] == ["file", "name", "name", "name"]


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A tiny random GPT-2 with a byte-level tokenizer, saved like a hub model."""
    return prism.build_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "model")


@pytest.mark.parametrize("chat", [False, True])
def test_llm_prompts_are_sanitised_and_cached_answers_need_no_llm(tiny_llm_dir, chat):
    """Random LLM output must still give named, bounded prompts, with or without a chat
    template; with its answers cached, the same prompts come without loading any LLM."""
    llm = prism.load_llm(str(tiny_llm_dir), "cpu")
    if chat:
        llm[1].chat_template = "{% for m in messages %}<user> {{ m['content'] }}\n{% endfor %}<assistant> "
    answers = {}
    prompts, classes = prism.build_prompts(NAMES, 6, llm=llm, answers=answers, scenes_per_class=3)
    assert len(answers) == 2 * len(NAMES)  # a description and a scene list per class
    again = prism.build_prompts(NAMES, 6, llm="/no/such/llm", answers=dict(answers),
                                scenes_per_class=3)
    assert again == (prompts, classes)
    if not chat:  # a name is loaded and gives the same answers as the loaded model
        assert prism.build_prompts(NAMES, 6, llm=str(tiny_llm_dir), scenes_per_class=3)[0] == prompts
    flat = [p for ps in prompts for p in ps]
    assert all(f" {name}" in p and len(p) < 400 and p.isprintable()
               for name, ps in zip(NAMES, prompts) for p in ps)
    assert len(set(flat)) == len(flat) == 24
    assert all(len(phrase.split()) <= 14 for e in classes for phrase in [e["description"], *e["scenes"]])


def test_llm_answers_that_name_a_neighbour_are_dropped():
    teacher, _ = head_teacher()
    answers = {}
    for name, near, description, scenes in (
            ("mouse", ["kite"], "a toy on a string like a kite", "1. on a desk\n2. next to a kite"),
            ("crane", ["tank"], "a tall lifting machine", "- at a building site\n- at a port"),
            ("kite", ["mouse"], "Kite", "\n"),
            ("tank", ["crane"], "", "in a field at dawn")):
        describe, where = prism.llm_questions(name, near, 12)
        answers.update({describe: description, where: scenes})
        assert all(n in describe and n in where for n in near)  # the neighbours are in the question
    prompts, classes = prism.build_prompts(NAMES, 4, teacher=teacher, neighbours=1, llm="/no/llm",
                                           answers=answers)
    assert [e["source"] for e in classes] == ["name", "llm", "name", "name"]
    assert classes[1]["description"] == "a tall lifting machine"
    assert [e["scenes"] for e in classes] == [["on a desk"], ["at a building site", "at a port"],
                                             list(prism.SCENES), ["in a field at dawn"]]
    assert [e["scene_source"] for e in classes] == ["llm", "llm", "built-in", "llm"]
    assert not any(prism.names_any(p, e["neighbours"]) for e, ps in zip(classes, prompts) for p in ps)


def test_names_are_whole_words_and_built_in_scenes_never_name_a_class():
    assert prism.names_any("two foxes and buses by the road", ["bus"])
    assert prism.names_any("next to a Computer,  Keyboard", ["computer keyboard"])
    assert not prism.names_any("a small plant-sucking insect on an elephant", ["ant", "plant"])
    assert not prism.names_any("a tiger cat in the grass", ["tiger"], own="tiger cat")
    assert prism.names_any("a tiger cat next to a tiger", ["tiger"], own="tiger cat")
    names = ["daylight", "side", "mouse"]  # classes that two built-in scenes would draw
    prompts, classes = prism.build_prompts(names, 40)
    assert classes[2]["scenes"] == [s for s in prism.SCENES
                                    if s not in ("in bright daylight", "seen from the side")]
    for entry, class_prompts in zip(classes, prompts):
        others = [n for n in names if n != entry["name"]]
        assert not any(prism.names_any(p, others, own=entry["name"]) for p in class_prompts)


def test_each_answer_line_is_one_short_phrase_and_the_chat_around_it_is_dropped():
    said = ("Sure! Here are 12 scenes:\n  1. A dog on a beach at dawn. It runs.\n- \"in the rain\"\n"
            "2) **Office Desk**: next to a laptop\n* **Store Shelf**\n**Indoors:**\n\x00\x01 ?? 12\n"
            "- in the rain\nWould you like more?\nA mouse is a small device.\nGreat question!\n"
            "- next to two kites\nThe mouse.\n"
            "- a long line of words that goes on and on past the limit of fourteen words\n"
            "### Outdoors\n1. On a cluttered desk - next to a laptop\n"
            "Certainly! The computer mouse is a small handheld pointing device.\n"
            + "word " * 50)
    assert prism.answer_phrases(said, {"name": "mouse", "neighbours": ["kite"]}) == [
        "A dog on a beach at dawn", "in the rain", "next to a laptop", "Store Shelf",
        "a small device", "a long line of words that goes on and on past the limit",
        "On a cluttered desk - next to a laptop", "a small handheld pointing device",
        " ".join(["word"] * 14)]


# Answers in the styles instruction-tuned LLMs write, and what must be kept of each:
# (class, description answer, description kept, scene answer, scenes kept); 4 scenes a class.
CHAT_ANSWERS = [
    ("mouse", "A mouse is a small handheld pointing device used to move a cursor on a screen.",
     "a small handheld pointing device used to move a cursor on a screen",
     "Sure! Here are 4 different scenes in which a photo of a 'mouse' is taken:\n\n"
     "1. On a cluttered office desk next to a laptop\n2. In a child's hand at a computer class\n"
     "3. Beside a glowing keyboard in a dark gaming room\n4. From above, on a wooden table\n\n"
     "These scenes capture the mouse in everyday settings. Let me know if you need more!",
     ["On a cluttered office desk next to a laptop", "In a child's hand at a computer class",
      "Beside a glowing keyboard in a dark gaming room", "From above, on a wooden table"]),
    ("trackball", "Sure! A trackball is a pointing device with a ball on top.",
     "a pointing device with a ball on top",
     "Here are some scenes:\n\n1. **Office Desk**: A cluttered desk with papers and a coffee mug.\n"
     "2. **Gaming Setup:** A glowing RGB mousepad beside a mechanical keyboard.\n"
     "3. **Laptop Bag** – Tucked into the side pocket of a backpack.\n4. **Store Shelf**\n\n"
     "I hope this helps!",
     ["A cluttered desk with papers and a coffee mug",
      "A glowing RGB mousepad beside a mechanical keyboard",
      "Tucked into the side pocket of a backpack", "Store Shelf"]),
    ("harp", "Certainly! Here is a noun phrase:\n\n**Harp**: a large stringed instrument",
     "a large stringed instrument",
     "1. **Concert Hall**: On a stage under warm spotlights. A harpist plays.\n"
     "2. **Music School** - In a practice room with sheet music\n"
     "“in the corner of a cosy reading room”\n'beside a grand piano by a window'",
     ["On a stage under warm spotlights", "In a practice room with sheet music",
      "in the corner of a cosy reading room", "beside a grand piano by a window"]),
    ("drone", "It is a small flying machine.", "a small flying machine",
     "• over a city street at night under orange street lights with wet pavement reflecting the "
     "glow\n•above a beach at noon\n• above a beach at noon\n• in a field, seen from below\n"
     "• over a forest in autumn\n• on a landing pad",  # too long, a repeat, too many
     ["over a city street at night under orange street lights with wet pavement reflecting",
      "above a beach at noon", "in a field, seen from below", "over a forest in autumn"]),
]


def test_llm_chat_answers_give_their_real_descriptions_and_scenes():
    names = [name for name, *_ in CHAT_ANSWERS]
    answers = {}
    for name, description, _, scenes, _ in CHAT_ANSWERS:
        answers.update(zip(prism.llm_questions(name, [], 4), (description, scenes)))
    prompts, classes = prism.build_prompts(names, 8, llm="/no/llm", answers=answers,
                                           scenes_per_class=4)
    for (name, _, description, _, scenes), entry in zip(CHAT_ANSWERS, classes):
        assert (entry["description"], entry["source"]) == (description, "llm"), name
        assert entry["scenes"] == scenes and entry["scene_source"] == "llm", name
    for entry, class_prompts in zip(classes, prompts):
        for prompt in class_prompts:
            subject = f"{with_article(entry['name'])}, {entry['description']}"
            assert split_prompt(prompt, subject)[1] in entry["scenes"]


# ── §2 sampling: equivalence with diffusers, gradient, monotone effects ─────────────────────
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
@pytest.mark.parametrize("scheduler", ["ddim", "ddim-v", "pndm", "euler"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_no_guidance_equals_diffusers_pipeline(pipe_dir, scheduler, cfg, tmp_path):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    if scheduler == "ddim-v":
        pipe = prism.random_pipeline(tmp_path, prediction_type="v_prediction")
    else:
        pipe = prism.load_diffusion_pipeline(pipe_dir, "cpu")
    if scheduler == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    start = latents(2)
    ours, _ = prism.energy_guided_sample(pipe, prism.build_tiny_classifier(4), PROMPTS[:2], [0, 1], latents=start,
                                         num_steps=8, cfg_scale=cfg, energy_scale=0.0, class_scale=0.0)
    theirs = pipe(PROMPTS[:2], latents=start, num_inference_steps=8, guidance_scale=cfg, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)


def direct_objective(vae, teacher, clean, ids, objective):
    """L(D(ẑ0), y) per sample, written out: full-size decode, [0, 1], the teacher, guidance_loss."""
    images = (vae.decode(clean / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return prism.guidance_loss(teacher(images), ids, **objective)


def test_approx_gradient_matches_finite_difference_on_clean_latent(pipe, teacher):
    """g = ∇_{ẑ0} L / sqrt(ᾱ) against a central difference of L(D(ẑ0(z_t))) with ε̂ held constant."""
    vae, teacher64 = copy.deepcopy(pipe.vae).double(), copy.deepcopy(teacher).double()
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    epsilon = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    direction = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    ids, alpha_bar = torch.tensor([1, 2]), 0.6
    objective = dict(energy_scale=1.0, class_scale=0.5, temperature=1.0)
    epsilon_out, grad = prism.guidance_gradient(lambda z, rows: epsilon[rows], vae, teacher64, noisy, alpha_bar,
                                                ids, batch_size=1, **objective)
    assert torch.equal(epsilon_out, epsilon)

    def loss(z_t):
        clean = (z_t - (1 - alpha_bar) ** 0.5 * epsilon) / alpha_bar ** 0.5
        return direct_objective(vae, teacher64, clean, ids, objective).sum()

    h = 1e-6  # kinks (ReLU, clamp) make larger steps less exact
    finite_difference = (loss(noisy + h * direction) - loss(noisy - h * direction)) / (2 * h)
    analytic = (grad.double() * direction).sum()
    assert analytic.abs() > 1e-3  # a gradient that is really there
    assert torch.isclose(analytic, finite_difference, rtol=1e-6)


def test_apply_guidance_without_normalize_adds_the_raw_gradient():
    epsilon, grad = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    guided, finite = prism.apply_guidance(epsilon, grad, 0.36, total_scale=0.25, normalize=False)
    torch.testing.assert_close(guided, epsilon + 0.8 * grad)  # ε̂ + sqrt(1 - ᾱ)·g
    assert finite.all()


class OverflowsOnFirstImage(nn.Module):
    """Multiplies the logits of the first image of every batch by infinity, as an fp16 overflow would."""

    def forward(self, logits):
        scale = torch.ones(len(logits), 1)
        scale[0] = float("inf")
        return logits * scale


def test_non_finite_teacher_never_poisons_images(pipe, teacher):
    """Guidance is skipped (and counted) where the gradient is not finite; other images are still guided."""
    overflowing = nn.Sequential(teacher, OverflowsOnFirstImage())
    start = latents(4)
    images, stats = prism.energy_guided_sample(pipe, overflowing, PROMPTS, [0, 1, 2, 3], latents=start,
                                               energy_scale=0.5, **SAMPLE)
    plain, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS, [0, 1, 2, 3], latents=start, energy_scale=0.0,
                                          class_scale=0.0, **SAMPLE)
    assert torch.isfinite(images).all()
    assert stats["guidance_skipped"].tolist() == [10, 0, 0, 0]
    torch.testing.assert_close(images[0], plain[0])  # left unguided
    assert not torch.allclose(images[1:], plain[1:])


@pytest.mark.parametrize("term, stat, sign, scales, effect", [  # s_E lowers E, s_C raises p(y)
    ("energy_scale", "energy", -1, (0.0, 0.1, 0.3, 0.6), 0.3), ("class_scale", "p_class", 1, (0.0, 0.2, 0.5), 0.0)])
def test_each_scale_alone_moves_its_own_term(pipe, teacher, term, stat, sign, scales, effect):
    start, prompts, ids = latents(8), PROMPTS * 2, [0, 1, 2, 3] * 2
    means = [sign * prism.energy_guided_sample(pipe, teacher, prompts, ids, latents=start, **SAMPLE, **{
        "energy_scale": 0.0, "class_scale": 0.0, term: scale})[1][stat].mean().item() for scale in scales]
    assert means == sorted(means) and len(set(means)) == len(scales)  # strictly monotone
    assert means[-1] - means[0] > effect  # a clear effect, not float noise


def test_channels_last_leaves_images_unchanged(pipe_dir, teacher, tmp_path):
    """--channels-last (on with CUDA), as load_sampler applies it, against the plain computation."""
    images = []
    for flag in ("--no-channels-last", "--channels-last"):
        args = prism.parse_args(["--sd-model", str(pipe_dir), "--out", str(tmp_path), flag])
        pipe = prism.load_sampler(args, torch.device("cpu"), tmp_path)
        channels_last = pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert channels_last == (flag == "--channels-last")
        images.append(prism.energy_guided_sample(pipe, teacher, PROMPTS[:2], [0, 1], latents=latents(2),
                                                 energy_scale=0.3, num_steps=4)[0])
    torch.testing.assert_close(images[1], images[0], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
@pytest.mark.parametrize("mode, options", [("exact", dict(exact_grad=True, energy_scale=0.3)),
                                           ("raw-gradient", dict(normalize_grad=False, energy_scale=300.0)),
                                           ("euler", dict(energy_scale=0.3))])
def test_every_guidance_mode_lowers_energy(pipe, teacher, mode, options):
    from diffusers import EulerDiscreteScheduler

    if mode == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    base, guided = (prism.energy_guided_sample(pipe, teacher, PROMPTS, [0, 1, 2, 3], latents=latents(4),
                                               class_scale=0.0, **SAMPLE, **run)[1]["energy"]
                    for run in (dict(energy_scale=0.0), options))
    assert guided.mean() < base.mean() - 0.1


def test_guidance_outside_window_changes_nothing(pipe, teacher):
    """A window that holds no step of the trajectory must leave the unguided sample as it is."""
    assert prism.guided_step_indices(10, 0.0, 1.0, 1) == set(range(10))
    assert prism.guided_step_indices(10, 0.95, 1.0, 1) == set()
    start = latents(2)
    kwargs = dict(latents=start, num_steps=10, energy_scale=0.5, class_scale=0.5, guidance_every=1)
    plain, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS[:2], [0, 1], guidance_start=0.0, guidance_end=1.0,
                                          **{**kwargs, "energy_scale": 0.0, "class_scale": 0.0})
    empty_window, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS[:2], [0, 1], guidance_start=0.95,
                                                 guidance_end=1.0, **kwargs)
    torch.testing.assert_close(empty_window, plain, atol=0, rtol=0)


def test_sampler_arguments_are_checked_where_they_enter(pipe):
    """The sampler trusts its inputs: the command line checks their ranges, then the model."""
    for bad in (["--steps", "0"], ["--energy-scale", "-1"], ["--guidance-start", "0.5", "--guidance-end", "0.4"],
                ["--guidance-end", "1.5"], ["--guidance-every", "0"], ["--lr", "inf"]):
        with pytest.raises(prism.UsageError, match=f"^{bad[0]}"):
            prism.parse_args(bad)
    for bad in (dict(height=21), dict(num_steps=1001)):
        with pytest.raises(prism.UsageError, match="multiples of 2|more than the 1000 the model"):
            prism.check_sampler(pipe, bad)
    pipe.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(prism.UsageError, match="needs an epsilon or v_prediction model, not 'sample'"):
        prism.check_sampler(pipe, SAMPLE)


# ── §2 the guidance gradient: the method's own, in float32 and float16, at bounded memory ────
def state_on_a_trajectory(pipe, teacher, step=3):
    """(z_t, t, ᾱ_t) of a guided trajectory at `step`, read from the sampler's trace."""
    trace = []
    prism.energy_guided_sample(pipe, teacher, PROMPTS, [0, 1, 2, 3], latents=latents(4), trace=trace, **SAMPLE)
    entry = trace[step]
    return entry["noisy"], entry["timestep"], entry["alpha_bar"]


def direct_gradient(pipe, teacher, noisy, t, alpha_bar, *, exact, objective, cfg=3.0, ids=(0, 1, 2, 3)):
    """g = ∇_{z_t} L(D(ẑ0(z_t)), y) written out with autograd: CFG ε̂ (held constant unless `exact`),
    Tweedie ẑ0, the full-size decode, the teacher."""
    text, uncond = pipe.encode_prompt(PROMPTS[:len(noisy)], "cpu", 1, True)
    z = noisy.detach().clone().requires_grad_(True)
    out_uncond, out_text = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, text])
                                     ).sample.chunk(2)
    epsilon = out_uncond + cfg * (out_text - out_uncond)
    epsilon = epsilon if exact else epsilon.detach()
    clean = (z - (1 - alpha_bar) ** 0.5 * epsilon) / alpha_bar ** 0.5
    loss = direct_objective(pipe.vae, teacher, clean, torch.tensor(ids[:len(noisy)]), objective)
    return torch.autograd.grad(loss.sum(), z)[0]


def prism_gradient(pipe, teacher, noisy, t, alpha_bar, *, exact, objective, batch_size=4):
    text, uncond = pipe.encode_prompt(PROMPTS[:len(noisy)], "cpu", 1, True)

    def predict(z, rows):  # the sampler's CFG ε̂
        return prism.cfg_prediction(pipe.unet, z, t, text[rows], uncond[rows], 3.0)
    return prism.guidance_gradient(predict, pipe.vae, teacher, noisy.to(pipe.unet.dtype), alpha_bar,
                                   torch.tensor([0, 1, 2, 3][:len(noisy)]), exact=exact, batch_size=batch_size,
                                   **objective)[1]


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@pytest.mark.parametrize("exact", [False, True])
def test_guidance_gradient_is_the_full_size_decode_gradient(pipe, teacher, exact):
    """The sampler's g equals a direct autograd computation of the method's gradient (§2)."""
    noisy, t, alpha_bar = state_on_a_trajectory(pipe, teacher)
    objective = dict(energy_scale=0.25, class_scale=0.25, temperature=1.0)
    expected = direct_gradient(pipe, teacher, noisy, t, alpha_bar, exact=exact, objective=objective)
    got = prism_gradient(pipe, teacher, noisy, t, alpha_bar, exact=exact, objective=objective)
    assert got.dtype == torch.float32 and expected.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    if not exact:
        assert cosines(got, direct_gradient(pipe, teacher, noisy, t, alpha_bar, exact=True,
                                            objective=objective)).min() < 0.9999  # the modes differ


@pytest.mark.parametrize("scale", [0.25, 1e-5])
def test_float16_guidance_keeps_the_gradient_direction(pipe, teacher, scale):
    """In float16 the pixel gradient (a scale spread over all pixels) is near float16's smallest
    numbers; loss scaling per sample keeps g's direction (cosine ≥ 0.99 with float32). At 1e-5
    (per-pixel values like 0.25 spread over a 512² image) plain autograd in float16 gives zeros."""
    noisy, t, alpha_bar = state_on_a_trajectory(pipe, teacher)
    objective = dict(energy_scale=scale, class_scale=scale, temperature=1.0)
    reference = direct_gradient(pipe, teacher, noisy, t, alpha_bar, exact=False, objective=objective)
    half = copy.deepcopy(pipe).to(torch.float16)
    got = prism_gradient(half, teacher, noisy, t, alpha_bar, exact=False, objective=objective)
    assert torch.isfinite(got).all() and cosines(got, reference).min() >= 0.99
    if scale < 1e-3:
        naive = direct_gradient(half, teacher, noisy.half(), t, alpha_bar, exact=False, objective=objective)
        assert (naive == 0).float().mean() > 0.5  # what the scaling prevents


def test_apply_guidance_rescales_g_and_a_non_finite_g_is_skipped_even_in_float16():
    """‖ε̂' - ε̂‖ = sqrt(1-ᾱ)·s·‖ε̂‖; a sample whose g is not finite is left unguided. In float16 too, with
    a tiny g and the ε̂ of a 1024² image: the arithmetic runs in float32 (in float16, ‖ε̂‖² = 65536
    overflows and ‖g‖² underflows)."""
    epsilon = torch.randn(3, 4, 128, 128, generator=torch.Generator().manual_seed(0)).half()
    grad = torch.randn(3, 4, 128, 128, generator=torch.Generator().manual_seed(1)) * 1e-6
    grad[2, 0, 0, 0] = float("nan")
    guided, finite = prism.apply_guidance(epsilon, grad.half(), 0.36, total_scale=0.25, normalize=True)
    expected, _ = prism.apply_guidance(epsilon.float(), grad.half().float(), 0.36, total_scale=0.25, normalize=True)
    assert guided.dtype == torch.float16 and torch.isfinite(guided).all() and finite.tolist() == [True, True, False]
    assert torch.equal(guided[2], epsilon[2]) and torch.equal(expected[2], epsilon[2].float())
    torch.testing.assert_close(guided.float(), expected, atol=2e-3, rtol=1e-3)
    shift = (expected - epsilon.float()).flatten(1).norm(dim=1)
    torch.testing.assert_close(shift[:2], 0.25 * 0.8 * epsilon.float().flatten(1).norm(dim=1)[:2], rtol=1e-4, atol=0)


class BatchSizes:
    """Records the batch size of every call of a module (a forward pre-hook)."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_pre_hook(lambda _, inputs: self.sizes.append(len(inputs[0])))


@pytest.mark.parametrize("exact", [False, True])
def test_guidance_batch_bounds_the_decode_and_changes_nothing(pipe, teacher, exact):
    noisy, t, alpha_bar = state_on_a_trajectory(pipe, teacher)
    objective = dict(energy_scale=0.25, class_scale=0.25, temperature=1.0)
    whole = prism_gradient(pipe, teacher, noisy, t, alpha_bar, exact=exact, objective=objective, batch_size=4)
    decoder = BatchSizes(pipe.vae.decoder)
    unet = BatchSizes(pipe.unet)
    small = prism_gradient(pipe, teacher, noisy, t, alpha_bar, exact=exact, objective=objective, batch_size=1)
    assert decoder.sizes == [1, 1, 1, 1] and max(unet.sizes) == (2 if exact else 8)  # CFG pairs
    torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-6 * whole.abs().max().item())


def test_default_scales_lower_energy_and_raise_class_probability(pipe, teacher):
    """At the defaults (50 steps, 15 guided, s_E = s_C = 0.25 with the ‖ε̂‖ rescale) guidance has
    an effect well above float noise, and it grows with the scales."""
    defaults = prism.SAMPLER
    assert prism.guided_step_indices(50, defaults["guidance_start"], defaults["guidance_end"],
                                     defaults["guidance_every"]) == set(range(5, 35, 2))
    start, prompts, ids = latents(8), PROMPTS * 2, [0, 1, 2, 3] * 2
    runs = {factor: prism.energy_guided_sample(pipe, teacher, prompts, ids, latents=start,
                                               energy_scale=factor * defaults["energy_scale"],
                                               class_scale=factor * defaults["class_scale"])[1]
            for factor in (0.0, 0.5, 1.0, 2.0)}
    energy = [runs[f]["energy"].mean().item() for f in runs]
    p_class = [runs[f]["p_class"].mean().item() for f in runs]
    assert energy[0] - energy[2] > 0.04 and p_class[2] - p_class[0] > 0.005  # the defaults do something
    assert energy == sorted(energy, reverse=True) and p_class == sorted(p_class)
    objective = {f: runs[f]["energy"] - runs[f]["p_class"].log() for f in runs}  # E + CE, what is guided
    assert (objective[1.0] < objective[0.0]).all()  # for every image, not just on average


class HugeLogits(nn.Module):
    """Logits times 1e30: with unnormalised gradients, guidance drives the latents to overflow."""

    def forward(self, logits):
        return logits * 1e30


def test_non_finite_latents_are_resampled_unguided_and_never_saved(pipe, teacher, tmp_path):
    wild = nn.Sequential(teacher, HugeLogits())
    start = latents(2)
    sample = dict(latents=start, normalize_grad=False, energy_scale=1e5, class_scale=0.0, **SAMPLE)
    images, stats = prism.energy_guided_sample(pipe, wild, PROMPTS[:2], [0, 1], **sample)
    plain, _ = prism.energy_guided_sample(pipe, wild, PROMPTS[:2], [0, 1], **dict(sample, energy_scale=0.0))
    assert stats["resampled_unguided"].tolist() == [True, True] and torch.isfinite(images).all()
    torch.testing.assert_close(images, plain)
    prism.synthesize_dataset(pipe, wild, prism.build_prompts(NAMES[:1], 2)[0], tmp_path / "set",
                             per_class=2, **dict(SYNTH, normalize_grad=False, energy_scale=1e5))
    assert all(pixels.std() > 5 for pixels in tree(tmp_path / "set").values())  # not black
    with pytest.raises(ValueError, match="non-finite"):
        prism.save_image_atomic(torch.full((3, 4, 4), float("nan")), tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")  # a model that fails even unguided
    with pytest.raises(prism.UsageError, match="non-finite pixels even without guidance"):
        prism.synthesize_dataset(pipe, teacher, prism.build_prompts(NAMES[:1], 1)[0], tmp_path / "nan",
                                 per_class=1, **SYNTH)
    assert not list((tmp_path / "nan").glob("*/*.png"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
def test_resample_with_a_stochastic_scheduler_equals_unguided_sampling(pipe, teacher):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    wild, start = nn.Sequential(teacher, HugeLogits()), latents(2)
    sample = dict(latents=start, normalize_grad=False, class_scale=0.0, **SAMPLE)
    (images, stats), (plain, _) = (prism.energy_guided_sample(
        pipe, wild, PROMPTS[:2], [0, 1], generator=[torch.Generator().manual_seed(s) for s in (11, 12)],
        energy_scale=scale, **sample) for scale in (1e5, 0.0))
    assert stats["resampled_unguided"].all()
    torch.testing.assert_close(images, plain)


# ── schedulers: which ones guidance can read, and per-image step noise ──────────────────────
SCHEDULERS = ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",  # (LMS needs scipy)
              "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
              "DEISMultistepScheduler", "KDPM2DiscreteScheduler"]


def oracle_drift(scheduler, prediction_type="epsilon", steps=20):
    """Samples with an oracle that knows x0: it predicts ε = (z_t - sqrt(ᾱ_t)·x0) / sqrt(1-ᾱ_t) with
    alpha_bar_at's ᾱ_t. If ᾱ_t is the scheduler's, z_t stays sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε0 and every
    recovered ε equals ε0; returns the largest deviation."""
    generator = torch.Generator().manual_seed(0)
    x0, epsilon0 = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    scheduler.set_timesteps(steps)
    latents_t = scheduler.add_noise(x0, epsilon0, scheduler.timesteps[:1])
    drift = 0.0
    for t in scheduler.timesteps:
        noisy = scheduler.scale_model_input(latents_t, t)
        alpha_bar = prism.alpha_bar_at(scheduler, t)
        epsilon = (noisy - alpha_bar ** 0.5 * x0) / (1 - alpha_bar) ** 0.5
        drift = max(drift, (epsilon - epsilon0).abs().max().item())
        output = prism.from_epsilon(epsilon, noisy, alpha_bar, prediction_type)
        latents_t = scheduler.step(output, t, latents_t, return_dict=False)[0]
    return drift


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
@pytest.mark.parametrize("name", SCHEDULERS)
def test_alpha_bar_at_follows_each_scheduler_and_kdpm2_is_refused(pipe, teacher, name):
    import diffusers

    scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    drift = oracle_drift(scheduler)
    if name.startswith("KDPM2"):
        assert drift > 1.0  # why it is refused
        pipe.scheduler = scheduler
        with pytest.raises(prism.UsageError, match="cannot use KDPM2DiscreteScheduler"):
            prism.check_sampler(pipe, SAMPLE)
        prism.check_sampler(pipe, {**SAMPLE, "energy_scale": 0.0, "class_scale": 0.0})  # unguided is fine
    else:
        assert drift < 1e-4
    if name == "DDIMScheduler":
        v_scheduler = scheduler.from_config(scheduler.config, prediction_type="v_prediction")
        assert oracle_drift(v_scheduler, "v_prediction") < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
def test_stochastic_scheduler_noise_is_per_image(pipe, teacher, tmp_path):
    """With one generator per image, an ancestral sampler's image does not depend on its batch."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    start = latents(3)
    sample = dict(num_steps=6, energy_scale=0.25, class_scale=0.25, guidance_start=0.0, guidance_every=1)
    batch, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS[:3], [0, 1, 2], latents=start,
                                          generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)], **sample)
    alone, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS[1:2], [1], latents=start[1:2],
                                          generator=[torch.Generator().manual_seed(8)], **sample)
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    shared, _ = prism.energy_guided_sample(pipe, teacher, PROMPTS[:3], [0, 1, 2], latents=start,
                                           generator=torch.Generator().manual_seed(8), **sample)
    assert (shared[1] - alone[0]).abs().max() > 1e-3  # one generator for the batch: not per image
    prompts = prism.build_prompts(NAMES[:2], 2)[0]  # and so a cached set does not depend on the batch size
    for batch_size in (1, 3):
        prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / f"batch{batch_size}", per_class=2,
                                 batch_size=batch_size, **SYNTH)
    same_images(tree(tmp_path / "batch3"), tree(tmp_path / "batch1"))


# ── §4 distillation and evaluation ──────────────────────────────────────────────────────────
@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """An ImageFolder of 24 random 32×32 images in 4 class folders."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for n in range(24):
        (folder / f"{n % 4:04d}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{n % 4:04d}/{n:05d}.png")
    return folder


def fixed_kd_loss(student, teacher, folder):
    """KD loss on the un-augmented images, the same batch every time."""
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 255
                          for p in sorted(folder.glob("*/*.png"))])
    with torch.no_grad():
        return prism.kd_loss(student.eval()(images), teacher(images), 4.0).item()


DISTILL = dict(batch_size=8, lr=0.05, temperature=4.0, image_size=32, num_workers=0, progress=False)


def test_distill_lowers_kd_loss(image_dir, teacher, tmp_path):
    student = prism.build_tiny_classifier(4, width=8, seed=1)
    before = fixed_kd_loss(student, teacher, image_dir)
    history = prism.distill(teacher, student, image_dir, epochs=6, **DISTILL)
    assert len(history) == 6 and all(np.isfinite(history))
    assert fixed_kd_loss(student, teacher, image_dir) < 0.5 * before


def test_distill_resumes_from_checkpoint_exactly(image_dir, teacher, tmp_path):
    whole = prism.build_tiny_classifier(4, width=8, seed=1)
    prism.distill(teacher, whole, image_dir, epochs=3, **DISTILL)
    shutil.copytree(image_dir, tmp_path / "synthetic")

    def stage(*flags):  # the distillation stage of a new process, with another global RNG history
        student, results = prism.build_tiny_classifier(4, width=8, seed=1), {}
        torch.rand(1000)
        args = prism.parse_args(["--smoke", "--out", str(tmp_path), "--epochs", "3", "--batch-size", "8",
                                 "--lr", "0.05", "--kd-temperature", "4", "--workers", "0", *flags])
        done = prism.distillation_stage(args, tmp_path, types.SimpleNamespace(teacher=teacher, student=student),
                                        {}, results, torch.device("cpu"))
        return done, results["distill"]["kd_loss"], student

    done, first, _ = stage("--epochs-this-run", "1")
    assert not done and len(first) == 1 and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    done, history, restarted = stage()
    assert done and len(history) == 3 and history[0] == first[0]
    for a, b in zip(whole.state_dict().values(), restarted.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(prism.UsageError, match="other settings .*lr"):
        stage("--lr", "0.01")


def test_the_distillation_stage_trains_in_channels_last_when_asked(image_dir, teacher, tmp_path):
    """--channels-last (on by default with CUDA) reaches distill(), as the benchmark times it."""
    shutil.copytree(image_dir, tmp_path / "synthetic")
    for flag, expected in (("--channels-last", True), ("--no-channels-last", False)):
        args = prism.parse_args(["--smoke", "--out", str(tmp_path), flag, "--epochs", "1", "--overwrite"])
        student = prism.build_tiny_classifier(4, width=8, seed=1)
        models = types.SimpleNamespace(teacher=teacher, student=student)
        assert prism.distillation_stage(args, tmp_path, models, {}, {}, torch.device("cpu"))
        weight = student[1][0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected


def test_persistent_workers_and_channels_last_train_the_same_student(image_dir, teacher, tmp_path):
    """Augmentations are seeded per (epoch, image), so two persistent worker processes give the
    batches of the main process; channels_last changes the memory layout, not the result."""
    results = {}
    for name, options in {"plain": {}, "workers": dict(num_workers=2), "channels_last": dict(channels_last=True)}.items():
        student = prism.build_tiny_classifier(4, width=8, seed=1)
        history = prism.distill(teacher, student, image_dir, epochs=2, **dict(DISTILL, **options))
        results[name] = history, student.state_dict()
    for name in ("workers", "channels_last"):
        np.testing.assert_allclose(results[name][0], results["plain"][0], rtol=1e-5)
        for key, value in results["plain"][1].items():
            torch.testing.assert_close(results[name][1][key].contiguous(), value, atol=1e-5, rtol=1e-4)


def test_seeded_augmentation_depends_on_epoch_and_image_only(image_dir):
    augment = prism.transforms.Compose([prism.transforms.RandomResizedCrop(16), prism.transforms.ToTensor()])
    dataset = prism.SeededAugmentation(prism.image_folder(image_dir, None), augment, seed=0)
    n = len(dataset)
    first = dataset[3][0]
    torch.rand(100)  # whatever happened to the global RNG in between
    assert torch.equal(dataset[3][0], first)
    assert not torch.equal(dataset[n + 3][0], first)  # the same image in the next epoch: another crop
    sampler = prism.EpochTaggedSampler(dataset, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(2)
    assert sorted(i - 2 * n for i in sampler) == list(range(n))


class ChannelMeans(nn.Module):
    """A classifier with a known answer: class = the brightest colour channel (0 red, 1 green, 2 blue)."""

    def forward(self, images):
        return images.mean(dim=(2, 3)) * 10


# ── §5 measuring the synthetic set: precision and recall; the synthetic set's report ──────────
def direct_precision_recall(real, fake, k):
    """Both metrics straight from their definitions, with the full distance matrices."""
    def distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).sqrt()

    real_radii = distances(real, real).sort(dim=1).values[:, k]  # column 0 is the point itself
    fake_radii = distances(fake, fake).sort(dim=1).values[:, k]
    d = distances(real, fake)  # (N real, M fake)
    return {"precision": (d < real_radii[:, None]).any(dim=0).double().mean().item(),
            "recall": (d < fake_radii[None, :]).any(dim=1).double().mean().item()}


def test_precision_recall_equals_direct_computation_and_batching_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(120, 16, generator=generator, dtype=torch.float64)
    fake = 0.8 * torch.randn(90, 16, generator=generator, dtype=torch.float64) + 0.3
    for k in (1, 3, 5):
        whole = prism.precision_recall(real, fake, k=k, batch_size=10 ** 6)
        assert whole == pytest.approx(direct_precision_recall(real, fake, k), abs=1e-12), k
        assert 0 < whole["precision"] < 1 and 0 < whole["recall"] < 1  # a case that can tell them apart
        assert prism.precision_recall(real, fake, k=k, batch_size=7) == whole


def test_precision_recall_constructed_cases():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(200, 8, generator=generator)
    assert prism.precision_recall(points, points.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert prism.precision_recall(points, points + 1000.0, k=3) == {"precision": 0.0, "recall": 0.0}

    # Ten well separated modes. A fake set on all of them vs one of the same size on half of them.
    centres = 50.0 * torch.eye(10, 8 + 2)

    def sample(modes, count):
        picks = torch.tensor(modes).repeat(count // len(modes))
        return centres[picks] + torch.randn(len(picks), 10, generator=generator)

    real = sample(range(10), 600)
    on_all, on_half = (prism.precision_recall(real, sample(modes, 600), k=3) for modes in (range(10), range(5)))
    assert on_half["recall"] == pytest.approx(on_all["recall"] / 2, rel=0.15)
    assert on_half["precision"] == pytest.approx(on_all["precision"], abs=0.1)


def test_extract_features_are_the_input_of_the_teachers_last_linear(image_dir, teacher):
    features, labels = prism.extract_features(teacher, image_dir, image_size=32, num_workers=0, progress=False)
    dataset = prism.image_folder(image_dir, prism.eval_transform(32))
    images = torch.stack([image for image, _ in dataset])
    with torch.no_grad():
        torch.testing.assert_close(features, teacher[1][:-1](teacher[0](images)))  # pooled penultimate layer
    assert labels.tolist() == [label for _, label in dataset.samples] and features.shape == (24, 32)


def test_the_synthetic_report_is_the_teachers_view_of_the_stored_images(smoke_run):
    teacher = prism.build_tiny_classifier(4, seed=0).eval()  # the smoke run's
    dataset = torchvision.datasets.ImageFolder(smoke_run / "synthetic", prism.eval_transform(32))
    with torch.no_grad():
        logits = torch.cat([teacher(x) for x, _ in torch.utils.data.DataLoader(dataset, batch_size=16)])
    labels, synthetic = torch.tensor(dataset.targets), json.loads((smoke_run / "results.json").read_text())["synthetic"]
    energy = -torch.logsumexp(logits, dim=1)  # τ = 1
    features = prism.extract_features(teacher, smoke_run / "synthetic", image_size=32, progress=False)[0]
    within = [np.mean([(f[a] - f[b]).norm().item() for a in range(4) for b in range(a + 1, 4)])
              for f in features.split(4)]  # 4 images a class
    assert synthetic == pytest.approx({
        "images": 16, "agreement": (logits.argmax(1) == labels).double().mean().item(),
        "mean_energy": energy.mean().item(), "std_energy": energy.std().item(),
        "mean_p_class": logits.softmax(1)[range(16), labels].mean().item(), "diversity": np.mean(within)}, rel=1e-5)


def test_ablations_turn_each_part_of_the_prompts_off():
    teacher, _ = head_teacher()
    files = ["a rodent", "a bird", "a toy", "a tank"]
    build = lambda **kw: prism.build_prompts(  # noqa: E731
        NAMES, 6, teacher=teacher, neighbours=1, descriptions=files, **kw)
    full, classes = build()
    assert all(e["source"] == "file" and e["neighbours"] and e["scene_source"] == "built-in"
               for e in classes)
    plain, classes = build(disambiguate=False)
    assert all(e["source"] == "name" and e["neighbours"] == [] and e["scene_source"] == "built-in"
               for e in classes)
    for name, ps in zip(NAMES, plain):
        assert all(split_prompt(p, f"a {name}")[1] in prism.SCENES for p in ps)
    no_content, classes = build(vary_content=False)
    for entry, with_scene, without in zip(classes, full, no_content):
        subject = f"a {entry['name']}, {entry['description']}"
        assert all(p.split(" of ", 1)[1] == subject for p in without)  # styles vary, nothing else
        assert len({p.split(" of ", 1)[1] for p in with_scene}) > 1  # the scenes that are gone
    no_style, _ = build(vary_style=False)
    assert all(p.startswith("a photo of ") for c in no_style for p in c)
    bare, _ = build(disambiguate=False, vary_content=False, vary_style=False)
    assert bare == [[f"a photo of a {name}"] * 6 for name in NAMES]
    # with both of the LLM's parts off, nothing is asked of it (a missing LLM is never loaded)
    assert build(disambiguate=False, vary_content=False, vary_style=False, llm="/no/llm")[0] == bare


def test_ablation_run_measures_without_distilling(tmp_path):
    out = tmp_path / "no-guidance"
    assert prism.main(["--smoke", "--out", str(out), "--ablate", "guidance", "style", "--epochs", "0"]) == 0
    settings = json.loads((out / "synthetic" / "settings.json").read_text())["settings"]
    assert settings["energy_scale"] == settings["class_scale"] == 0.0
    prompts = json.loads((out / "prompts.json").read_text())
    assert prompts["settings"]["ablate"] == ["style"] and all(p.startswith("a photo of ") for c in prompts["classes"]
                                                                for p in c["prompts"])
    results = json.loads((out / "results.json").read_text())
    assert results["ablate"] == ["guidance", "style"] and "distill" not in results
    assert not (out / "checkpoint.pt").exists() and not (out / "student.pt").exists()
    assert results["synthetic"]["images"] == 16 == results["precision_recall"]["synthetic_images"]
    [stand_in] = results["evaluation"]["sets"]  # no student: no student numbers, no gap
    assert "student" not in stand_in and "gap_top1" not in stand_in and "teacher" in stand_in
    assert (out / "contact_sheet.png").exists()


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART II — PLUMBING: files and resume, folders, model loading, processes, the command line
# ══════════════════════════════════════════════════════════════════════════════════════════


# ── caching: resume, settings, damaged images ───────────────────────────────────────────────
SYNTH = dict(num_steps=6, energy_scale=0.2, class_scale=0.1, guidance_start=0.0, guidance_end=1.0, guidance_every=2,
             height=16, width=16, progress=False)


def tree(folder):
    """{relative path: pixels} of every image under folder."""
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*/*.png"))}


def note(path):
    """The provenance note an image carries in its EXIF."""
    with Image.open(path) as image:
        return json.loads(image.getexif()[0x010E])


def test_resumed_synthesis_equals_uninterrupted_and_a_damaged_image_is_named_then_remade(pipe, teacher, tmp_path):
    prompts = prism.build_prompts(NAMES[:3], 3)[0]
    whole = prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "whole", per_class=3, batch_size=4, **SYNTH)
    folder = tmp_path / "resumed"
    first = prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=3, batch_size=4, max_new_images=5,
                                     **SYNTH)
    assert len(first) == 5 and len(tree(folder)) == 5
    resumed = prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=3, batch_size=2, **SYNTH)

    expected, got = tree(tmp_path / "whole"), tree(folder)
    assert list(got) == whole == resumed == [f"{c:04d}/{i:05d}.png" for c in range(3) for i in range(3)]
    same_images(got, expected)  # other batch compositions: equal up to one 8-bit level
    notes = {name: note(folder / name) for name in resumed}
    assert all(notes[f"{c:04d}/{i:05d}.png"]["seed"] == prism.image_seed(0, c, i) and
               notes[f"{c:04d}/{i:05d}.png"]["prompt"] == prompts[c][i] for c in range(3) for i in range(3))
    assert len({n["seed"] for n in notes.values()}) == 9  # every image has noise of its own

    # A damaged image is named where it is read; deleted, it alone is made again.
    (folder / "0001/00002.png").write_bytes((folder / "0001/00002.png").read_bytes()[:60])
    for workers in (0, 1):  # a worker's error reaches the main process as a UsageError too
        loader, _ = prism.kd_loader(folder, 9, image_size=16, num_workers=workers)
        with pytest.raises(prism.UsageError, match=r"0001/00002.png is damaged \(.*\); delete it and rerun the "
                                                   r"same command \(a synthetic image is remade\)"):
            next(iter(loader))
    (folder / "0001/00002.png").unlink()
    times = {p: p.stat().st_mtime_ns for p in folder.glob("*/*.png")}
    prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=3, batch_size=2, **SYNTH)
    assert [p for p in folder.glob("*/*.png") if times.get(p) != p.stat().st_mtime_ns] == [folder / "0001/00002.png"]
    same_images(tree(folder), expected)


def test_guidance_that_overflows_is_skipped_or_the_image_remade_unguided_with_a_warning(pipe, teacher, tmp_path,
                                                                                        capsys):
    """The teacher overflows on the first image of every batch (batches of 2: index 0 of each class)."""
    prompts = prism.build_prompts(NAMES[:2], 2)[0]
    prism.synthesize_dataset(pipe, nn.Sequential(teacher, OverflowsOnFirstImage()), prompts, tmp_path / "overflow",
                             per_class=2, batch_size=2, **SYNTH)
    prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "unguided", per_class=2, batch_size=2,
                             **dict(SYNTH, energy_scale=0.0, class_scale=0.0))
    overflow, unguided = tree(tmp_path / "overflow"), tree(tmp_path / "unguided")
    for name, pixels in overflow.items():  # readable, not black: the overflowing ones are simply unguided
        assert pixels.std() > 5
        difference = np.abs(pixels.astype(int) - unguided[name].astype(int)).max()
        assert difference <= 1 if name.endswith("00000.png") else difference > 1
    assert "prism: warning" not in capsys.readouterr().err  # finite images: none remade
    wild = nn.Sequential(teacher, HugeLogits())  # the latents overflow: remade unguided, said in one line
    prism.synthesize_dataset(pipe, wild, prompts, tmp_path / "wild", per_class=2, **dict(
        SYNTH, normalize_grad=False, energy_scale=1e5))
    assert capsys.readouterr().err == ("prism: warning: guidance overflowed on 4 images: made unguided instead "
                                       "(--dtype float32 avoids it)\n")
    same_images(tree(tmp_path / "wild"), unguided)


def test_atomic_writes_and_image_notes(tmp_path):
    image = torch.rand(3, 12, 10)
    prism.save_image_atomic(image, tmp_path / "a.png", '{"seed": 1}')
    expected = (image * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), expected)  # PNG is lossless
    prism.save_image_atomic(image, tmp_path / "b.jpg", '{"seed": 2}')
    with Image.open(tmp_path / "b.jpg") as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (10, 12)
    assert note(tmp_path / "a.png") == {"seed": 1} and note(tmp_path / "b.jpg") == {"seed": 2}
    (tmp_path / ".c.json.tmp0").write_text("a killed run's temp file")  # the next write takes its place
    prism.write_json_atomic({"kept": True}, tmp_path / "c.json")

    def fails_half_way(temp):
        temp.write_text('{"half": ')
        raise OSError("No space left on device")

    with pytest.raises(prism.UsageError, match="No space left"):
        prism.atomic_write(tmp_path / "c.json", fails_half_way)
    assert json.loads((tmp_path / "c.json").read_text()) == {"kept": True}  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.jpg", "c.json"]  # no temp file left


def test_synthesis_refuses_other_settings_and_overwrite_replaces_the_set(pipe, teacher, tmp_path, monkeypatch):
    prompts, folder = prism.build_prompts(NAMES[:2], 2)[0], tmp_path / "set"
    prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, **SYNTH)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for change in (dict(SYNTH, energy_scale=0.5), dict(SYNTH, num_steps=7)):
        with pytest.raises(prism.UsageError, match="other settings"):
            prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, **change)
    with pytest.raises(prism.UsageError, match="prompts_sha256"):
        prism.synthesize_dataset(pipe, teacher, prism.build_prompts(NAMES[:2], 2, seed=5)[0], folder, per_class=2, **SYNTH)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # A different batch size is not a different setting: nothing to do, nothing rewritten.
    prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, batch_size=1, **SYNTH)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # --overwrite: killed before the new settings are recorded, no old image is left.
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(prism, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, overwrite=True, **dict(SYNTH, num_steps=7))
    monkeypatch.undo()
    assert tree(folder) == {} and json.loads((folder / "settings.json").read_text())["settings"]["num_steps"] == 6
    prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, overwrite=True, **dict(SYNTH, num_steps=7))
    assert json.loads((folder / "settings.json").read_text())["settings"]["num_steps"] == 7
    prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "fresh", per_class=2, **dict(SYNTH, num_steps=7))
    same_images(tree(folder), tree(tmp_path / "fresh"))
    # Images without their settings.json are refused, not deleted; --overwrite with fewer classes
    # leaves no folder of the old set (the loader would read it as a class).
    (folder / "settings.json").unlink()
    with pytest.raises(prism.UsageError, match="holds images but no settings.json: --overwrite"):
        prism.synthesize_dataset(pipe, teacher, prompts, folder, per_class=2, **SYNTH)
    assert len(tree(folder)) == 4
    prism.synthesize_dataset(pipe, teacher, prompts[:1], folder, per_class=2, overwrite=True, **SYNTH)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0000"] and len(tree(folder)) == 2


# ── labelled test sets: class mapping (ImageNet val, -V2, -Sketch, -R, -A layouts) ──────────
class NearestGrey(nn.Module):
    """A classifier with a known answer: class j is the grey level 16·j / 255, the nearest level
    wins; `bias` is added to the logits (a large one makes a class win every image)."""

    def __init__(self, num_classes, bias=None):
        super().__init__()
        self.levels = torch.arange(num_classes) * 16 / 255
        self.bias = torch.zeros(num_classes) if bias is None else torch.tensor(bias, dtype=torch.float)

    def forward(self, images):
        grey = images.mean(dim=(1, 2, 3)).unsqueeze(1)
        return -1000 * (grey - self.levels) ** 2 + self.bias


def grey_tree(root, images_of_folder, size=8):
    """An ImageFolder tree: folder name → the grey classes (NearestGrey) of its solid images."""
    for folder, greys in images_of_folder.items():
        (root / folder).mkdir(parents=True)
        for n, grey in enumerate(greys):
            Image.new("RGB", (size, size), (16 * grey,) * 3).save(root / folder / f"{n}.png")
    return root


def noise_tree(root, folders, per_folder=2, size=8, seed=0):
    """An ImageFolder tree of random images, `per_folder` in each of `folders`."""
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for n in range(per_folder):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{n}.png")
    return root


@torch.no_grad()
def direct_accuracy(model, root, class_of_folder, subset=None, image_size=8):
    """Top-1 / top-5 (%) recomputed image by image: the eval transform, the model, its logits
    restricted to the classes `subset` (default: the set's), ranked, mapped back to classes."""
    transform = prism.eval_transform(image_size)
    subset = sorted(class_of_folder.values()) if subset is None else subset
    hits1 = hits5 = images = 0
    for folder, label in class_of_folder.items():
        for path in sorted((root / folder).iterdir()):
            logits = model.eval()(transform(Image.open(path).convert("RGB")).unsqueeze(0))[0]
            ranked = [subset[j] for j in logits[subset].argsort(descending=True)[:5]]
            hits1, hits5, images = hits1 + (ranked[0] == label), hits5 + (label in ranked), images + 1
    return {"top1": 100.0 * hits1 / images, "top5": 100.0 * hits5 / images, "images": images}


EVAL = dict(image_size=8, num_workers=0, progress=False)


def test_class_mapping_rules_and_refusals():
    names = ["mouse", "crane", "kite", "tank"]
    assert prism.class_mapping(["0", "1", "10", "2"], 12, [str(c) for c in range(12)]) == (
        [0, 1, 10, 2], "integer folder names")  # V2: integers, not string order
    assert prism.class_mapping(["0001", "0003"], 4, names) == ([1, 3], "integer folder names")
    assert prism.class_mapping(["Kite", "mouse"], 4, names) == ([2, 0], "class names")
    wnids = ["n01", "n02", "n03", "n04"]
    assert prism.class_mapping(["n02", "n04"], 4, names, wnids) == ([1, 3], "--class-ids")
    assert prism.class_mapping(["n00000009", "n00000002", "n00000005", "n00000007"], 4, names) == (
        [3, 0, 1, 2], "sorted folder names")  # a full set of WordNet ids: ImageNet's sorted order
    refusals = {"folder '4' is class 4, but the teacher's classes are 0 to 3": (["0", "4"], names),
                "folders '0003' and '3' are both class 3": (["0003", "3"], names),
                "folder 'n05' maps to no class": (["n02", "n05"], names, wnids),
                "folder 'x' maps to no class": (["mouse", "x", "kite"], names),
                "folder 'tanks' maps to no class": (["crane", "kite", "mouse", "tanks"], names),
                "folder 'w' maps to no class": (["w", "x", "y", "z"], names),  # not ids: refused
                "folder 'a' names classes \\[0, 2\\]": (["a", "b"], ["a", "b", "A", "c"]),
                # --class-ids given: the file's order, never the sorted folders'
                "folder 'n00000002' maps": (["n00000002", "n00000005", "n00000007", "n00000009"], names, wnids)}
    for message, (folders, class_names, *class_ids) in refusals.items():
        with pytest.raises(prism.UsageError, match=message):
            prism.class_mapping(folders, 4, class_names, *class_ids)
    with pytest.raises(prism.UsageError, match="give --class-ids FILE .* ImageNet-R"):
        prism.class_mapping(["n02", "n04"], 4, names)  # a subset of ids, and no list of them


def test_val_dir_names_and_an_empty_folder(tmp_path):
    assert prism.named_val_sets(["imagenet=/data/val", "/data/imagenet-r/", "/x=y/sketch"]) == [
        ("imagenet", Path("/data/val")), ("imagenet-r", Path("/data/imagenet-r")),
        ("sketch", Path("/x=y/sketch"))]
    for values in (["=/data/val"], ["a=/x", "a=/y"], ["/x/a", "a=/y"], ["v="]):  # no name, twice, no folder
        with pytest.raises(prism.UsageError, match="give each set a folder and a name of its own"):
            prism.named_val_sets(values)
    (tmp_path / "empty").mkdir()
    with pytest.raises(prism.UsageError, match=r"--val-dir e \(.*\): .*find any class folder"):
        prism.labelled_sets([("e", tmp_path / "empty")], NAMES)


def test_numeric_v2_tree_is_scored_in_integer_order(tmp_path):
    """Folders 0 … 11 sort as strings 0, 1, 10, 11, 2, …: only integer order scores a perfect
    classifier at 100%; the sorted-folder labels of before scored it at 2 of 12."""
    root = grey_tree(tmp_path / "v2", {str(c): [c, c] for c in range(12)})
    [v2] = prism.labelled_sets([("v2", root)], [f"class {c}" for c in range(12)])
    assert v2["mapping"] == "integer folder names" and v2["images"] == 24
    assert dict(zip(v2["folders"], v2["classes"])) == {str(c): c for c in range(12)}
    result = prism.evaluate(NearestGrey(12), root, classes=v2["classes"], **EVAL)
    assert result == direct_accuracy(NearestGrey(12), root, {str(c): c for c in range(12)})
    assert result == {"top1": 100.0, "top5": 100.0, "images": 24}
    assert prism.evaluate(NearestGrey(12), root, **EVAL)["top1"] == 100.0 * 4 / 24  # string order
    features, labels = prism.extract_features(NearestGrey(12), root, classes=v2["classes"], **EVAL)
    assert labels.tolist() == [int(folder) for folder in v2["folders"] for _ in range(2)]


def test_subset_is_scored_with_restricted_logits_over_its_classes(tmp_path):
    """A subset of the classes in id folders (ImageNet-R/-A), mapped by --class-ids, is scored
    over its classes' logits only."""
    wnids = [f"n{c:08d}" for c in range(8)]
    # classes 1, 3, 4; NearestGrey gets the second image of n03 wrong (grey 4), and class 6's grey
    # in n04 right once the logits are restricted (4 is the nearest of 1, 3, 4)
    subset = grey_tree(tmp_path / "r", {"n00000003": [3, 4], "n00000001": [1], "n00000004": [4, 6]})
    names = [f"class {c}" for c in range(8)]
    [r] = prism.labelled_sets([("r", subset)], names, wnids)
    assert (r["mapping"], r["classes"], r["images"]) == ("--class-ids", [1, 3, 4], 5)
    biased = NearestGrey(8, bias=[0] * 7 + [1e4])  # class 7 wins every image over all logits
    result = prism.evaluate(biased, subset, classes=r["classes"], **EVAL)
    assert result == direct_accuracy(biased, subset, {"n00000001": 1, "n00000003": 3, "n00000004": 4})
    assert result == {"top1": 80.0, "top5": 100.0, "images": 5}  # top-5 of 3 classes: all of them
    unrestricted = direct_accuracy(biased, subset,
                                {"n00000001": 1, "n00000003": 3, "n00000004": 4}, range(8))
    assert unrestricted == {"top1": 0.0, "top5": 100.0, "images": 5}

    # a random teacher on random images: the same numbers as the direct computation
    teacher = prism.build_tiny_classifier(8, seed=2).eval()
    noise = noise_tree(tmp_path / "noise", ["n00000001", "n00000005", "n00000006"], per_folder=4)
    [mapped] = prism.labelled_sets([("r", noise)], names, wnids)
    assert (prism.evaluate(teacher, noise, classes=mapped["classes"], **EVAL)
            == direct_accuracy(teacher, noise, {"n00000001": 1, "n00000005": 5, "n00000006": 6}))
    with pytest.raises(prism.UsageError, match=r"--val-dir r \(.*\): folder 'n00000001' maps to no class"):
        prism.labelled_sets([("r", subset)], names)  # no --class-ids: refused


def test_evaluation_table():
    full = {"name": "v2", "classes": 4, "teacher": {"top1": 100.0, "top5": 100.0, "images": 4},
            "student": {"top1": 25.0, "top5": 100.0, "images": 4}, "gap_top1": 75.0}
    sub = {"name": "imagenet-r", "classes": 2, "teacher": {"top1": 5.5, "top5": 61.25, "images": 300},
           "student": {"top1": 5.0, "top5": 60.0, "images": 300}, "gap_top1": 0.5}
    assert prism.evaluation_table([full, sub], 4).splitlines()[::2] == [
        "| set | images | classes | teacher top-1 | teacher top-5 | student top-1 | student top-5 | gap top-1 |",
        "| v2 | 4 | 4/4 | 100.00 | 100.00 | 25.00 | 100.00 | 75.00 |"]
    assert prism.evaluation_table([{k: sub[k] for k in ("name", "classes", "teacher")}], 4).splitlines()[2] == \
        "| imagenet-r | 300 | 2/4 | 5.50 | 61.25 |"  # --epochs 0: no student


# ── classes and teacher loading ─────────────────────────────────────────────────────────────
def test_class_list_and_class_ids_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("mouse\tthe computer pointing device\n\ncrane\n")
    assert prism.load_class_names(str(path)) == (["mouse", "crane"], ["the computer pointing device", ""])
    path.write_text("tench\ngoldfish\n")
    assert prism.load_class_names(str(path)) == (["tench", "goldfish"], None)
    assert prism.read_lines(path, "--class-ids", 2) == [["tench"], ["goldfish"]]
    with pytest.raises(prism.UsageError, match="--class-ids .* has 2 lines but the teacher has 4 classes"):
        prism.read_lines(path, "--class-ids", 4)
    for text, message in (("", "empty"), ("a\nb\nA\n", "twice"), ("a\n\tb\n", "no name before its tab")):
        path.write_text(text)
        with pytest.raises(prism.UsageError, match=f"^--data {path} .*{message}"):
            prism.load_class_names(str(path))
    with pytest.raises(prism.UsageError, match="cannot be read"):
        prism.load_class_names(str(tmp_path / "missing.txt"))


def teacher_weights(path, seed=0):
    """A --teacher-weights file: a random shufflenet_v2_x0_5's state dict with 4 outputs."""
    model = prism.seeded(seed, lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=4))
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_torchvision_teacher_is_frozen_and_preprocessed_as_its_weights_define(tmp_path):
    """resnet50's DEFAULT (V2) weights: resize 232, crop 224 — its published top-1's protocol."""
    weights = torchvision.models.ResNet50_Weights.DEFAULT
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    teacher, names = prism.load_teacher("resnet50", "cpu", weights_path=tmp_path / "r50.pt")
    assert names is None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert (teacher[0].input_size, teacher[0].resize_size) == (224, 232)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = prism.eval_transform(teacher[0].input_size, teacher[0].resize_size)(image).unsqueeze(0)
    torch.testing.assert_close(teacher[0](ours)[0], weights.transforms()(image), atol=2e-2, rtol=0)
    with pytest.raises(prism.UsageError, match=f"weights {tmp_path / 'r50.pt'} .*--teacher-weights"):
        prism.load_teacher("resnet50", "cpu", weights_path=tmp_path / "r50.pt", num_classes=4)
    with pytest.raises(prism.UsageError, match="expected value 1000 but got 4.*--teacher-weights"):
        prism.load_teacher("resnet50", "cpu", num_classes=4)  # torchvision's weights: its classes
    for flag in ("--teacher", "--student"):  # names checked as the flags are parsed
        with pytest.raises(prism.UsageError, match=f"^{flag}: must be a torchvision classifier"):
            prism.parse_args([flag, "no_such_net"])


# ── the KD input path and the processes of a cluster ─────────────────────────────────────────
def test_kd_batches_travel_as_uint8_and_equal_the_float_pipeline(image_dir):
    """kd_loader's uint8 batches, made float on the device, are exactly the batches of the
    float32 ToTensor pipeline (same crops and flips: the augmentation's random draws are kept)."""
    from torchvision import transforms

    loader, sampler = prism.kd_loader(image_dir, 8, image_size=32, num_workers=0, seed=3)
    sampler.set_epoch(1)
    got = [prism.to_unit_images(batch, "cpu") for batch, _ in loader]
    assert next(iter(loader))[0].dtype == torch.uint8
    float_augment = transforms.Compose([transforms.RandomResizedCrop(32, scale=(prism.ARGS.crop_scale, 1)),
                                        transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    dataset = prism.SeededAugmentation(prism.image_folder(image_dir, None), float_augment, 3)
    tagged = list(sampler)  # epoch·N + i, as the loader's workers receive them
    expected = [torch.stack([dataset[t][0] for t in tagged[k:k + 8]]) for k in range(0, len(tagged) - 7, 8)]
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_stored_size_is_recorded_and_a_stale_cache_is_refused(pipe, teacher, tmp_path):
    prompts = prism.build_prompts(NAMES[:2], 2)[0]
    [first, *_] = prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "full", per_class=2, **SYNTH)
    prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "small", per_class=2, store_size=8, **SYNTH)
    for path in (tmp_path / "small").glob("*/*.png"):
        assert Image.open(path).size == (8, 8)
    for path in (tmp_path / "full").glob("*/*.png"):
        assert Image.open(path).size == (16, 16)
        assert note(path) == note(tmp_path / "small" / path.relative_to(tmp_path / "full"))  # scored at full size
    stored = np.asarray(Image.open(tmp_path / "small" / first), dtype=np.float64)
    full = torch.tensor(np.asarray(Image.open(tmp_path / "full" / first), dtype=np.float32) / 255).permute(2, 0, 1)
    resized = prism.transforms.functional.resize(full, 8, antialias=True).clamp(0, 1)  # the full image, made small
    assert np.abs(stored - resized.permute(1, 2, 0).numpy() * 255).max() <= 1.0
    assert json.loads((tmp_path / "small" / "settings.json").read_text())["settings"]["store_size"] == 8
    with pytest.raises(prism.UsageError, match="other settings .*store_size: 8 -> 12"):
        prism.synthesize_dataset(pipe, teacher, prompts, tmp_path / "small", per_class=2, store_size=12, **SYNTH)


def test_a_process_sees_its_own_gpu_or_the_one_it_was_given():
    assert prism.process_gpu(0, 8) == 0 and prism.process_gpu(5, 8) == 5
    assert prism.process_gpu(5, 1) == 0  # a launcher gave each process one GPU (CUDA_VISIBLE_DEVICES)
    with pytest.raises(prism.UsageError, match="process 8 of this node has no GPU of its own"):
        prism.process_gpu(8, 8)


def test_default_workers_and_channels_last_follow_the_machine(monkeypatch):
    cores, workers = len(os.sched_getaffinity(0)), lambda: prism.parse_args(["--out", "x"]).workers
    assert prism.CORES == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert workers() == min(12, max(0, cores - 1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert workers() == 0
    monkeypatch.setattr(prism, "CORES", 224)  # a big node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert workers() == 12  # 27 cores a process, capped
    assert prism.parse_args(["--workers", "3"]).workers == 3
    # channels_last: on with CUDA (faster convolutions there), off on a CPU, unless a flag says
    assert prism.parse_args(["--device", "cuda:1"]).channels_last is True
    assert prism.parse_args(["--device", "cpu"]).channels_last is False
    assert prism.parse_args(["--device", "cpu", "--channels-last"]).channels_last is True
    assert prism.parse_args(["--device", "cuda", "--no-channels-last"]).channels_last is False


# ── main(): smoke run end to end, resume, and every bad input ───────────────────────────────
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert prism.main(["--smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_end_to_end(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert results["synthetic"]["images"] == 16 == len(list((smoke_run / "synthetic").glob("*/*.png")))
    assert results["distill"]["epochs_done"] == 2
    [stand_in] = results["evaluation"]["sets"]  # no --val-dir: the synthetic set stands in
    assert set(stand_in["student"]) == {"top1", "top5", "images"}
    assert (stand_in["name"], stand_in["mapping"], stand_in["protocol"]) == (
        "synthetic", "integer folder names", "all 4 classes")
    stored = json.loads((smoke_run / "prompts.json").read_text())
    assert [len(e["prompts"]) for e in stored["classes"]] == [4] * 4
    assert stored["settings"]["llm"] == "tiny-random"
    classes = stored["classes"]  # counted by the source of their description and of their scenes
    assert results["prompts"] == {"llm": "tiny-random",
                                  "description_sources": prism.collections.Counter(e["source"] for e in classes),
                                  "scene_sources": prism.collections.Counter(e["scene_source"] for e in classes)}
    assert sum(results["prompts"]["scene_sources"].values()) == 4
    student = prism.build_tiny_classifier(4, width=8)
    student.load_state_dict(torch.load(smoke_run / "student.pt", weights_only=True))
    # a rerun skips finished stages
    files = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.is_file() and "tiny-models" not in str(p)}
    assert prism.main(["--smoke", "--out", str(smoke_run)]) == 0
    changed = {p.name for p, t in files.items() if p.stat().st_mtime_ns != t}
    assert changed <= {"results.json", "student.pt"}  # no image, prompt or checkpoint redone


BAD_CLASS_LISTS = {"empty class list": "\n", "duplicate class": "a\nb\na\nc\n", "class count": "a\nb\nc\n",
                   "not UTF-8": "caf\xe9\nb\nc\nd\n", "tab without a name": "a\n\tthe second\nc\nd\n"}
BAD_FLAGS = {
        "unknown teacher": ["--teacher", "resnet5000"],
        "missing class list": ["--data", "missing-classes.txt"],
        "zero per class": ["--per-class", "0"],
        "zero steps": ["--steps", "0"],
        "negative epochs": ["--epochs", "-1"],
        "negative energy scale": ["--energy-scale", "-0.1"],
        "negative cfg": ["--cfg", "-2"],
        "not finite": ["--energy-scale", "nan"],
        "more steps than trained": ["--smoke", "--steps", "2000"],
        "empty out": ["--out", ""],
        "empty llm": ["--llm", " "],
        "more scenes than an answer holds": ["--scenes-per-class", "40"],
        "a count that fills the memory": ["--check-seeds", "1000000000"],
        "two tools at once": ["--smoke", "--benchmark", "--check-guidance"],
        "a guidance check without guidance": ["--smoke", "--check-guidance", "--ablate", "guidance"],
        "abbreviated flag": ["--smoke", "--per", "3"],
        "huge seed": ["--seed", "99999999999999999999999"],
        "too many workers": ["--workers", "100000"],
        "student input too small": ["--smoke", "--image-size", "1"],
        "pr-k above the set": ["--smoke", "--pr-k", "100"],
        "repeated val-dir name": ["--val-dir", "imagenet=a", "--val-dir", "imagenet=b"],
        "missing class ids": ["--smoke", "--class-ids", "no-such-ids.txt"],
        "removed cheap decode": ["--guidance-downsample", "2"],
        "window order": ["--guidance-start", "0.8", "--guidance-end", "0.5"],
        "a scheduler whose package is missing": ["--smoke", "--scheduler", "DPMSolverSDEScheduler"],
        "window range": ["--guidance-end", "1.5"],
        "photo share": ["--photo-share", "1.5"],
        "not a number": ["--steps", "many"],
        "unknown flag": ["--no-such-flag"],
        "no gpu": ["--smoke", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
}


@pytest.mark.parametrize("case", [*BAD_FLAGS, *BAD_CLASS_LISTS])
def test_bad_input_exits_2_with_one_line(case, tmp_path, pipe_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if case in BAD_CLASS_LISTS:  # a 4-output teacher with a broken class list
        (tmp_path / "classes.txt").write_bytes(BAD_CLASS_LISTS[case].encode("latin-1"))
        argv = ["--teacher", "shufflenet_v2_x0_5", "--teacher-weights", teacher_weights(tmp_path / "t.pt"),
                "--data", "classes.txt", "--sd-model", str(pipe_dir)]
    else:
        argv = BAD_FLAGS[case]
    assert prism.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: ") and err.count("\n") == 1, err


def test_out_with_other_settings_exits_2_and_keeps_data(smoke_run, capsys):
    before = {p: p.read_bytes() for p in (smoke_run / "synthetic").rglob("*") if p.is_file()}
    code, err = run_main(["--smoke", "--out", str(smoke_run), "--energy-scale", "0.3"], capsys)
    assert code == 2 and "energy_scale" in one_line(err, "prism: error: ") and "other settings" in err
    assert prism.main(["--smoke", "--out", str(smoke_run), "--per-class", "5"]) == 2
    assert {p: p.read_bytes() for p in (smoke_run / "synthetic").rglob("*") if p.is_file()} == before


def test_val_dir_with_wrong_classes_and_unwritable_out_exit_2(tmp_path, capsys):
    for name in ("a", "b", "c"):
        (tmp_path / "val" / name).mkdir(parents=True)
    for c in range(5):  # 0 ... 4: class 4 is past the 4 classes of the smoke teacher
        (tmp_path / "v2" / str(c)).mkdir(parents=True)
    for val, message in (("val", "--val-dir val ({}): folder 'a' maps to no class"),
                         ("v2", "--val-dir v2 ({}): folder '4' is class 4, but the teacher's classes")):
        code, err = run_main(["--smoke", "--out", str(tmp_path / "out"), "--val-dir", str(tmp_path / val)],
                             capsys)
        assert code == 2 and one_line(err, "prism: error: " + message.format(tmp_path / val))
        assert not (tmp_path / "out" / "synthetic").exists()  # refused before any work
    (tmp_path / "file").write_text("")
    assert prism.main(["--smoke", "--out", str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err.startswith("prism: error: cannot use --out")


def test_command_line_bad_input_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "prism.py", "--per-class", "0", "--out", str(tmp_path)],
                            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr == "prism: error: --per-class: must be from 1 to 100,000, got 0\n"


def local_models_argv(tmp_path, pipe_dir):
    """The real (non-smoke) command line with every model local: SD folder, teacher weights, class file."""
    (tmp_path / "classes.txt").write_text("".join(f"{name}\n" for name in NAMES))
    return ["--teacher", "shufflenet_v2_x0_5", "--teacher-weights", teacher_weights(tmp_path / "t.pt"), "--data",
            str(tmp_path / "classes.txt"), "--sd-model", str(pipe_dir), "--student", "resnet18", "--out",
            str(tmp_path / "out"), "--per-class", "2", "--steps", "4", "--height", "32", "--width", "32",
            "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", "--device", "cpu",
            "--llm", "none"]


def test_main_with_local_models_refuses_a_changed_teacher_and_retrains_after_overwrite(pipe_dir, tmp_path, capsys):
    """The real (non-smoke) path with every model local."""
    argv = local_models_argv(tmp_path, pipe_dir)
    assert prism.main(argv) == 0
    assert "warning: running on the CPU" in capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["synthetic"]["images"] == 8 and results["distill"]["epochs_done"] == 1

    # Other weights saved under the same file name are another teacher: refused, nothing touched.
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    old_settings = json.loads((tmp_path / "out" / "synthetic" / "settings.json").read_text())["settings"]
    teacher_weights(tmp_path / "t.pt", seed=7)
    assert prism.main(argv) == 2
    assert "other settings" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before

    # --overwrite remakes prompts and images, and the old checkpoint (other data) is not resumed.
    assert prism.main(argv + ["--overwrite"]) == 0
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    settings = json.loads((tmp_path / "out" / "synthetic" / "settings.json").read_text())["settings"]
    assert settings["teacher"] != old_settings["teacher"]  # same file name, new fingerprint
    assert checkpoint["config"]["data"] == settings  # trained on the new images, not resumed
    assert checkpoint["student"]["1.fc.weight"].shape == (4, 512)


def test_prompts_only_writes_what_to_read_and_the_run_reuses_it_without_the_llm(tmp_path, capsys,
                                                                                monkeypatch):
    out = tmp_path / "out"
    assert prism.main(["--smoke", "--out", str(out), "--prompts-only"]) == 0
    assert (f"prompts: {out / 'prompts.json'}; read them, then rerun without --prompts-only"
            in capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == [".prism.lock", "llm_answers.json", "prompts.json",
                                                      "tiny-models"]
    stored = json.loads((out / "prompts.json").read_text())
    assert [e["name"] for e in stored["classes"]] == NAMES
    for entry in stored["classes"]:  # a person reads each class's parts next to its prompts
        assert {"description", "source", "neighbours", "scenes", "scene_source"} <= set(entry)
        assert len(entry["prompts"]) == 4 and all(entry["name"] in p for p in entry["prompts"])
    answers = (out / "llm_answers.json").read_bytes()

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded although its answers are cached")

    monkeypatch.setattr(prism, "load_llm", no_llm)
    before = (out / "prompts.json").read_bytes()
    assert prism.main(["--smoke", "--out", str(out), "--epochs", "0"]) == 0  # resume: same prompts
    assert (out / "prompts.json").read_bytes() == before and (out / "synthetic").is_dir()
    (tmp_path / "five").mkdir()
    (tmp_path / "five" / "llm_answers.json").write_bytes(answers)  # other prompts, the same questions
    assert prism.main(["--smoke", "--out", str(tmp_path / "five"), "--prompts-only", "--per-class", "5"]) == 0
    assert (tmp_path / "five" / "llm_answers.json").read_bytes() == answers
    five = json.loads((tmp_path / "five" / "prompts.json").read_text())
    assert [len(e.pop("prompts")) for e in five["classes"] + stored["classes"]] == [5] * 4 + [4] * 4
    assert five["classes"] == stored["classes"]  # the same answers, fewer prompts


def test_llm_none_uses_the_built_in_prompts(tmp_path, capsys):
    out = tmp_path / "out"
    assert prism.main(["--smoke", "--out", str(out), "--prompts-only", "--llm", "none"]) == 0
    stored = json.loads((out / "prompts.json").read_text())
    assert stored["settings"]["llm"] is None and not (out / "llm_answers.json").exists()
    assert all(e["source"] == "name" and e["scenes"] == list(prism.SCENES) for e in stored["classes"])
    before = (out / "prompts.json").read_bytes()  # without an LLM its scene count changes nothing
    assert prism.main(["--smoke", "--out", str(out), "--prompts-only", "--llm", "none",
                       "--scenes-per-class", "5"]) == 0
    assert (out / "prompts.json").read_bytes() == before


def test_repeated_ablations_add_up_and_help_shows_only_real_defaults(capsys):
    args = prism.parse_args(["--smoke", "--ablate", "content", "--ablate", "style", "content"])
    assert args.ablate == ["content", "style"] and prism.parse_args(["--smoke"]).ablate == []
    with pytest.raises(SystemExit):
        prism.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "denoising steps (default: 50)" in text and "--seed SEED seed of prompts" in text


def test_damaged_llm_answers_are_named_and_overwrite_remakes_them(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "llm_answers.json").write_bytes(b'{"answers": {"tiny-random": 3}}')
    code, err = run_main(["--smoke", "--out", str(out), "--prompts-only"], capsys)
    assert code == 2
    one_line(err, f"prism: error: {out / 'llm_answers.json'} is damaged (its answers are missing or malformed)")
    assert "delete it" in err
    assert run_main(["--smoke", "--out", str(out), "--prompts-only", "--overwrite"], capsys)[0] == 0
    assert len(json.loads((out / "llm_answers.json").read_text())["answers"]["tiny-random"]) == 8


def test_a_model_that_cannot_be_found_is_one_short_line_at_once(tmp_path, capsys, pipe_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for load, flag, extra in ((prism.load_diffusion_pipeline, "--sd-model", ""),
                              (prism.load_llm, "--llm", "; or use --llm none")):
        with pytest.raises(prism.UsageError) as error:
            load("someone/no-such-model", "cpu")
        message = str(error.value)
        assert message.startswith(f"{flag} someone/no-such-model: not in the local cache and the hub "
                                  f"is off (HF_HUB_OFFLINE); download it") and extra in message
        assert len(message) < 300
        with pytest.raises(prism.UsageError, match=f"^{flag} ./missing: no such model on the hub and no such folder"):
            load("./missing", "cpu")
        with pytest.raises(prism.UsageError, match=f"^cannot load .* {tmp_path} "):  # found, not a model
            load(str(tmp_path), "cpu")
    argv = [a for a in local_models_argv(tmp_path, pipe_dir) if a != "none"][:-1]  # the default LLM
    code, err = run_main(argv, capsys)
    assert code == 2 and len(err) < 300
    one_line(err, f"prism: error: --llm {prism.ARGS.llm}: not in the local cache")
    assert "--llm none" in err and not (tmp_path / "out" / "prompts.json").exists()
    (tmp_path / "empty-llm").mkdir()  # a folder, but no model: said before SD loads
    code, err = run_main(argv + ["--llm", str(tmp_path / "empty-llm")], capsys)
    assert code == 2 and len(err) < 300
    one_line(err, f"prism: error: cannot load LLM {tmp_path / 'empty-llm'} (")


# ── several processes (torchrun, gloo on CPU) and faults (SIGKILL, full disk) ───────────────
def same_images(got, expected):
    """Same file names, and pixels equal up to one 8-bit level (other batch compositions and
    thread counts round differently)."""
    assert list(got) == list(expected)
    for name in expected:
        assert np.abs(got[name].astype(int) - expected[name].astype(int)).max() <= 1, name


def leftovers(folder):
    """Temp files: none may remain after a finished run."""
    return sorted(str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name)


def torchrun_two_processes(argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "prism.py", *argv], cwd=HERE, capture_output=True, text=True, timeout=600, env=OFFLINE)


def test_torchrun_two_processes_equal_one_process(smoke_run, tmp_path):
    """Three images made by one process, the rest by two (their shares of the check and of the
    work then differ), then distillation and evaluation over both."""
    out = tmp_path / "torchrun"
    assert prism.main(["--smoke", "--out", str(out), "--max-new-images", "3"]) == 0
    result = torchrun_two_processes(["--smoke", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synthesis, rank 0's share of 13: 100%|██████████| 7/7" in result.stderr  # each made half
    same_images(tree(out / "synthetic"), tree(smoke_run / "synthetic"))
    assert leftovers(out) == []

    results = json.loads((out / "results.json").read_text())
    assert results["distill"]["epochs_done"] == 2 and all(np.isfinite(results["distill"]["kd_loss"]))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    # Top-1/5 reduced over two ranks = the same models evaluated by one process on the same images.
    student = prism.build_tiny_classifier(4, width=8, seed=1)
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    evaluation = dict(image_size=32, num_workers=0, progress=False)
    [stand_in] = results["evaluation"]["sets"]
    assert prism.evaluate(student, out / "synthetic", **evaluation) == stand_in["student"]
    teacher = prism.build_tiny_classifier(4, seed=0)
    assert prism.evaluate(teacher, out / "synthetic", **evaluation) == stand_in["teacher"]


def run_and_kill(argv, ready, timeout=300):
    """Runs prism.py in a subprocess and kills it with SIGKILL as soon as ready() is true."""
    process = subprocess.Popen([sys.executable, "prism.py", *argv], cwd=HERE, env=OFFLINE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    finished = process.poll() is not None
    process.kill()
    process.wait()
    assert not finished, "the run ended before it could be killed"


def test_killed_in_synthesis_then_in_distillation_resumes_as_uninterrupted(smoke_run, tmp_path, capsys):
    """SIGKILL in synthesis, then in distillation: each rerun resumes, and ends as one uninterrupted run."""
    out, checkpoint = tmp_path / "killed", tmp_path / "killed" / "checkpoint.pt"
    run_and_kill(["--smoke", "--out", str(out), "--gen-batch", "1"],
                 ready=lambda: len(list(out.glob("synthetic/*/*.png"))) >= 5)
    images = sorted(out.glob("synthetic/*/*.png"))
    assert 5 <= len(images) < 16
    for path in images:  # nothing partial or empty under a final name
        with Image.open(path) as image:
            image.load()
    times = {path: path.stat().st_mtime_ns for path in images}
    assert prism.main(["--smoke", "--out", str(out)]) == 0
    assert all(path.stat().st_mtime_ns == time for path, time in times.items())  # none made again
    same_images(tree(out / "synthetic"), tree(smoke_run / "synthetic"))
    argv = ["--smoke", "--out", str(out), "--epochs", "40", "--overwrite"]  # other epochs: a new training run

    def epochs_done():
        try:
            return torch.load(checkpoint, weights_only=True)["config"]["epochs"] == 40 and \
                torch.load(checkpoint, weights_only=True)["epoch"] >= 3
        except Exception:  # not written yet (never half written: atomic rename)
            return False

    run_and_kill(argv, ready=epochs_done)
    saved = torch.load(checkpoint, weights_only=True)
    assert 3 <= saved["epoch"] < 40 and len(saved["history"]) == saved["epoch"]
    capsys.readouterr()
    assert prism.main(argv) == 0
    bars = capsys.readouterr().err
    assert f"distill {saved['epoch'] + 1}/40" in bars and "distill 1/40" not in bars and "distill 3/40" not in bars
    history = json.loads((out / "results.json").read_text())["distill"]["kd_loss"]
    assert len(history) == 40 and history[:saved["epoch"]] == saved["history"]

    # The same 40 epochs in one uninterrupted call give the same weights.
    student = prism.build_tiny_classifier(4, width=8, input_size=32, seed=1)
    whole = prism.distill(prism.build_tiny_classifier(4, seed=0), student, out / "synthetic", epochs=40, batch_size=8,
                          lr=0.05, image_size=32, num_workers=0, progress=False)
    np.testing.assert_allclose(whole, history, rtol=1e-4)
    resumed = torch.load(out / "student.pt", weights_only=True)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(value, resumed[name], atol=1e-4, rtol=1e-4)
    assert leftovers(out) == []


# ── faults a user or a crash leaves behind: one line, the right exit code, and a way back ────
def run_main(argv, capsys):
    """(exit code, stderr) of prism.main(argv)."""
    capsys.readouterr()
    code = prism.main(argv)
    return code, capsys.readouterr().err


def one_line(err, start):
    """The error is the last line of stderr (progress bars may come before it), and only one."""
    lines = err.rstrip("\n").split("\n")
    assert lines[-1].startswith(start) and "Traceback" not in err, err
    assert not any(line.startswith("prism:") for line in lines[:-1]), err
    return lines[-1]


@pytest.fixture()
def finished_run(smoke_run, tmp_path):
    """A private copy of the finished smoke run, to damage."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    return out


def image_times(out):
    return {p: p.stat().st_mtime_ns for p in (out / "synthetic").glob("*/*.png")}


@pytest.mark.parametrize("flags", [["--lr", "1e9"],  # diverges within an epoch
                                   ["--lr", "1e29", "--epochs", "1", "--batch-size", "16"]])  # at its last step
def test_diverging_training_stops_with_one_line_and_no_nan_model(tmp_path, capsys, flags):
    out = tmp_path / "diverge"
    code, err = run_main(["--smoke", "--out", str(out), *flags], capsys)
    assert code == 1
    one_line(err, "prism: failed: distillation diverged in epoch ")
    assert "--lr" in err and not (out / "student.pt").exists() and not (out / "results.json").exists()
    if (out / "checkpoint.pt").exists():  # only a good epoch is ever checkpointed
        saved = torch.load(out / "checkpoint.pt", weights_only=True)
        assert all(np.isfinite(saved["history"])) and all(torch.isfinite(v).all() for v in saved["student"].values())
    code, _ = run_main(["--smoke", "--out", str(out), "--overwrite", *flags[2:]], capsys)  # the way out
    assert code == 0 and (out / "student.pt").exists()


def test_every_json_written_is_strict(tmp_path):
    prism.write_json_atomic({"a": [1.0, float("nan")], "b": {"c": float("inf")}}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda token: pytest.fail(token)) == \
        {"a": [1.0, None], "b": {"c": None}}


@pytest.mark.parametrize("name", ["prompts.json", "synthetic/settings.json"])
@pytest.mark.parametrize("damage", [b"\xff\xfe{", b"", b"[1, 2]", b'{"settings": "x"'])
def test_damaged_json_state_is_named_and_overwrite_recovers(finished_run, capsys, name, damage):
    (finished_run / name).write_bytes(damage)
    times = image_times(finished_run)
    code, err = run_main(["--smoke", "--out", str(finished_run)], capsys)
    assert code == 2
    one_line(err, f"prism: error: {finished_run / name} is damaged (")
    assert "--overwrite" in err and "other settings" not in err
    code, err = run_main(["--smoke", "--out", str(finished_run), "--overwrite"], capsys)
    assert code == 0, err
    # the images are kept, or, their settings unknown, made again
    assert (image_times(finished_run) == times) == (name == "prompts.json")
    assert json.loads((finished_run / name).read_text())["settings"]


def test_prompts_with_intact_settings_but_no_prompts_are_damaged_and_overwrite_rebuilds(finished_run, capsys):
    path = finished_run / "prompts.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({"settings": stored["settings"], "classes": "lost"}))
    code, err = run_main(["--smoke", "--out", str(finished_run)], capsys)
    assert code == 2
    one_line(err, f"prism: error: {path} is damaged (its classes are missing or malformed)")
    times = image_times(finished_run)
    assert run_main(["--smoke", "--out", str(finished_run), "--overwrite"], capsys)[0] == 0
    assert json.loads(path.read_text()) == stored and image_times(finished_run) == times


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not a checkpoint", "another student",
                                    "epoch not a number"])
def test_damaged_checkpoint_is_named_and_overwrite_retrains(finished_run, capsys, damage):
    checkpoint = finished_run / "checkpoint.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(500)}.get(damage, b""))
    if damage == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    saved = torch.load(io.BytesIO(data), weights_only=True)
    if damage == "another student":  # loads, has every key, but its weights do not fit
        saved["student"] = prism.build_tiny_classifier(4, width=4).state_dict()
    if damage == "epoch not a number":
        saved["epoch"] = "x"
    if damage in ("another student", "epoch not a number"):
        torch.save(saved, checkpoint)
    times = image_times(finished_run)
    code, err = run_main(["--smoke", "--out", str(finished_run), "--epochs", "3"], capsys)
    assert code == 2
    reason, _, way_out = one_line(err, f"prism: error: {checkpoint} is damaged (")[len(str(checkpoint)) + 27:] \
        .rpartition("); ")
    assert 0 < len(reason) <= 120 and way_out == "rerun with --overwrite to restart training (the images are kept)"
    code, err = run_main(["--smoke", "--out", str(finished_run), "--epochs", "3", "--overwrite"], capsys)
    assert code == 0, err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 3 and image_times(finished_run) == times


def test_a_damaged_image_is_named_where_it_is_read_and_remade_once_deleted(finished_run, capsys):
    image = finished_run / "synthetic" / "0002" / "00001.png"
    image.write_bytes(image.read_bytes()[:100])
    argv = ["--smoke", "--out", str(finished_run), "--epochs", "3", "--overwrite"]  # distillation reads it
    code, err = run_main(argv, capsys)
    assert code == 2
    assert one_line(err, f"prism: error: {image} is damaged (").endswith(
        "; delete it and rerun the same command (a synthetic image is remade)")
    image.unlink()
    code, err = run_main(argv, capsys)
    assert code == 0 and image.is_file(), err


def test_several_val_dirs_are_scored_side_by_side(finished_run, tmp_path, capsys):
    """The finished smoke run, rerun with three real sets: a full one in wnid folders (first:
    precision/recall's in-distribution set), a V2-style numeric one named by its folder, and a
    subset of two of the wnids (--class-ids). Each is scored for teacher and student as a direct
    computation does, and the stdout table is evaluation_table's."""
    wnids = ["n00000002", "n00000005", "n00000007", "n00000009"]
    (tmp_path / "ids.txt").write_text("\n".join(wnids) + "\n")
    full = noise_tree(tmp_path / "val", wnids, per_folder=2, size=32, seed=1)
    v2 = noise_tree(tmp_path / "imagenetv2", ["0", "1", "2", "3"], per_folder=2, size=32, seed=2)
    subset = noise_tree(tmp_path / "r", ["n00000009", "n00000005"], per_folder=3, size=32, seed=3)
    capsys.readouterr()
    assert prism.main(["--smoke", "--out", str(finished_run), "--val-dir", f"val={full}", "--val-dir", str(v2),
                       "--val-dir", f"imagenet-r={subset}", "--class-ids", str(tmp_path / "ids.txt")]) == 0
    stdout = capsys.readouterr().out
    results = json.loads((finished_run / "results.json").read_text())
    sets = results["evaluation"]["sets"]
    assert [(s["name"], s["data"], s["protocol"], s["mapping"]) for s in sets] == [
        ("val", str(full), "all 4 classes", "--class-ids"),
        ("imagenetv2", str(v2), "all 4 classes", "integer folder names"),
        ("imagenet-r", str(subset), "restricted to 2 of 4 classes", "--class-ids")]
    assert sets[2]["folders"] == {"n00000005": 1, "n00000009": 3}
    teacher = prism.build_tiny_classifier(4, seed=0)
    student = prism.build_tiny_classifier(4, width=8, seed=1)
    student.load_state_dict(torch.load(finished_run / "student.pt", weights_only=True))
    labels = ({w: c for c, w in enumerate(wnids)}, {str(c): c for c in range(4)}, {"n00000005": 1, "n00000009": 3})
    for entry, root, class_of_folder in zip(sets, (full, v2, subset), labels):
        assert entry["teacher"] == direct_accuracy(teacher, root, class_of_folder, image_size=32)
        assert entry["student"] == direct_accuracy(student, root, class_of_folder, image_size=32)
        assert entry["gap_top1"] == entry["teacher"]["top1"] - entry["student"]["top1"]
    assert results["precision_recall"]["set"] == "val" and results["precision_recall"]["real_images"] == 8
    assert json.dumps({k: results[k] for k in ("synthetic", "precision_recall")}, indent=1) in stdout
    table = prism.evaluation_table(sets, 4)
    assert table in stdout and table.splitlines()[4].startswith("| imagenet-r | 6 | 2/4 | ")


def test_a_subset_first_is_compared_with_the_synthetic_images_of_its_classes(finished_run,
                                                                             tmp_path):
    """ImageNet-R first: precision/recall compare its classes' real images with the synthetic
    images of those classes only, as a direct computation on the features does."""
    subset = noise_tree(tmp_path / "r", ["1", "3"], per_folder=5, size=32, seed=4)
    assert prism.main(["--smoke", "--out", str(finished_run), "--val-dir", f"r={subset}"]) == 0
    report = json.loads((finished_run / "results.json").read_text())["precision_recall"]
    assert (report["set"], report["classes"], report["real_images"], report["k"]) == ("r", 2, 10, 3)
    assert report["synthetic_images"] == 8  # 4 images of class 1 and 4 of class 3, of 16
    teacher = prism.build_tiny_classifier(4, seed=0)
    features = dict(image_size=32, num_workers=0, progress=False)
    fake, fake_labels = prism.extract_features(teacher, finished_run / "synthetic", **features)
    real, _ = prism.extract_features(teacher, subset, **features)
    shared = (fake_labels == 1) | (fake_labels == 3)
    expected = prism.precision_recall(real, fake[shared], k=3)
    assert {m: report[m] for m in expected} == pytest.approx(expected)


def test_rejected_height_records_nothing_and_the_fixed_rerun_works(tmp_path, capsys):
    out = tmp_path / "height"
    code, err = run_main(["--smoke", "--out", str(out), "--height", "25"], capsys)
    assert code == 2
    one_line(err, "prism: error: --height and --width must be multiples of 2")
    assert not (out / "synthetic" / "settings.json").exists()
    assert run_main(["--smoke", "--out", str(out), "--height", "24", "--epochs", "0"], capsys)[0] == 0


def test_settings_that_do_nothing_are_refused_or_warned(tmp_path, capsys):
    from diffusers import PNDMScheduler

    code, err = run_main(["--smoke", "--out", str(tmp_path / "a"), "--guidance-start", "0.95",
                          "--guidance-end", "0.99"], capsys)
    assert code == 2
    one_line(err, "prism: error: the guidance window [0.95, 0.99) every 1 holds none of the 10 sampling steps")
    assert not (tmp_path / "a" / "prompts.json").exists()
    pipe = prism.load_diffusion_pipeline(tmp_path / "a" / "tiny-models" / "pipeline", "cpu")
    window = dict(num_steps=10, guidance_start=0.81, guidance_end=0.9, guidance_every=1)
    with pytest.raises(prism.UsageError, match="none of the 10 sampling"):  # DDIM's 10: none is
        prism.check_sampler(pipe, window)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    with pytest.raises(prism.UsageError, match="multistep"):  # PNDM's 11 timesteps: step 9 is in
        prism.check_sampler(pipe, window)  # the window, so it is the multistep rule that refuses
    code, err = run_main(["--smoke", "--out", str(tmp_path / "b"), "--cfg", "1", "--epochs", "0"], capsys)
    assert code == 0 and err.startswith("prism: warning: --cfg 1.0 <= 1 turns classifier-free guidance off")


def displacement_along_g(pipe, teacher, steps=20):
    """Per step from the first guided one, each image's guided − unguided latent along the unit
    direction of its first guided push, -g (default window, every 2nd step, the same noise)."""
    states = {}
    for guided in (True, False):
        seen, step = [], pipe.scheduler.step
        pipe.scheduler.step = lambda *a, **k: (lambda out: seen.append(out[0]) or out)(step(*a, **k))
        trace = []
        scales = {} if guided else dict(energy_scale=0.0, class_scale=0.0)
        prism.energy_guided_sample(pipe, teacher, PROMPTS, [0, 1, 2, 3], latents=latents(4),
                                   num_steps=steps, trace=trace, **scales)
        pipe.scheduler.step = step
        states[guided] = torch.stack(seen), trace
    (path, trace), (unguided, _) = states[True], states[False]
    unit = -torch.nn.functional.normalize(trace[0]["grad"].flatten(1), dim=1)  # L descends
    first, last = trace[0]["step"], trace[-1]["step"]
    return torch.stack([((path[k] - unguided[k]).flatten(1) * unit).sum(1)
                        for k in range(first, last + 2)])


def test_guided_runs_use_a_single_step_scheduler_made_from_the_models_config(pipe_dir, teacher,
                                                                             tmp_path, capsys):
    """SD 1.5 ships PNDM, a multistep method: guided on every second step, its push see-saws
    along g. Loaded as the real command loads it, the pipeline samples with DDIM made from its
    config, and the push only grows; PNDM itself is refused, and said in the settings."""
    from diffusers import PNDMScheduler

    pndm = prism.load_diffusion_pipeline(pipe_dir, "cpu")
    pndm.scheduler = PNDMScheduler.from_config(pndm.scheduler.config, skip_prk_steps=True)
    pndm.save_pretrained(tmp_path / "pndm")
    argv, cpu = ["--sd-model", str(tmp_path / "pndm"), "--out", str(tmp_path / "out")], torch.device("cpu")
    pipe = prism.load_sampler(prism.parse_args(argv), cpu, tmp_path / "out")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == pndm.scheduler.config.beta_schedule
    along = displacement_along_g(pipe, teacher)
    assert (along[0] > 0).all() and (along.diff(dim=0) > 0).all()  # no reversal, image by image
    see_saw = displacement_along_g(prism.load_diffusion_pipeline(tmp_path / "pndm", "cpu"), teacher)
    assert (see_saw.diff(dim=0) < 0).any()  # what the test catches
    with pytest.raises(prism.UsageError, match="PNDMScheduler is a multistep scheduler"):
        prism.load_sampler(prism.parse_args(argv + ["--scheduler", "model"]), cpu, tmp_path)
    every_step = ["--guidance-start", "0", "--guidance-end", "1", "--guidance-every", "1"]
    pipe = prism.load_sampler(prism.parse_args(argv + ["--scheduler", "model"] + every_step), cpu,
                              tmp_path / "out")
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    with pytest.raises(prism.UsageError, match="--scheduler Nope: not one this model can use"):
        prism.load_sampler(prism.parse_args(argv + ["--scheduler", "Nope"]), cpu, tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' schedulers
def test_every_multistep_scheduler_is_refused_when_only_some_steps_are_guided(pipe):
    import diffusers

    window = dict(num_steps=10, guidance_start=0.1, guidance_end=0.7, guidance_every=2)
    every = dict(num_steps=10, guidance_start=0.0, guidance_end=1.0, guidance_every=1)
    multistep = ["PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "DEISMultistepScheduler", "HeunDiscreteScheduler"]
    for name in multistep + ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                             "EulerAncestralDiscreteScheduler"]:
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
        if name in multistep:
            with pytest.raises(prism.UsageError, match=f"{name} is a multistep scheduler"):
                prism.check_sampler(pipe, window)
        else:
            prism.check_sampler(pipe, window)
        prism.check_sampler(pipe, every)  # every step guided: the push of every step is the method's


def test_corrupt_validation_image_is_found_before_synthesis(tmp_path, capsys):
    val = tmp_path / "val"
    for c in range(4):
        (val / f"{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(val / f"{c}" / "ok.png")
    (val / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    code, err = run_main(["--smoke", "--out", str(out), "--val-dir", str(val)], capsys)
    assert code == 2
    one_line(err, f"prism: error: --val-dir val: {val / '2' / 'broken.png'} is not a readable "
                  f"image")
    assert not (out / "synthetic").exists() and not (out / "prompts.json").exists()


def check_a_share_of_the_images(rank, world, root):
    """One rank of a gloo group: decodes its share of root/val, keeps the error it raises and
    the files it opened."""
    opened, open_image = [], Image.open
    Image.open = lambda path, *more: opened.append(str(path)) or open_image(path, *more)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                                         world_size=world)
    with pytest.raises(prism.UsageError) as error:
        prism.labelled_sets([("val", root / "val")], NAMES)
    (root / f"rank{rank}.txt").write_text(str(error.value))
    (root / f"rank{rank}.json").write_text(json.dumps(opened))
    torch.distributed.destroy_process_group()


def test_every_rank_refuses_a_broken_image_only_one_of_them_decoded(tmp_path):
    for c in range(4):
        (tmp_path / "val" / f"{c}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(tmp_path / "val" / f"{c}" / "ok.png")
    (tmp_path / "val" / "0" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # image 0: rank 0's
    torch.multiprocessing.spawn(check_a_share_of_the_images, args=(2, tmp_path), nprocs=2)
    broken = str(tmp_path / "val" / "0" / "ok.png")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(
            f"--val-dir val: {broken} is not a readable image")
    # rank 1 decoded its own share, images 1 and 3, and learned of image 0 from rank 0
    assert json.loads((tmp_path / "rank1.json").read_text()) == [
        str(tmp_path / "val" / f"{c}" / "ok.png") for c in (1, 3)]


def test_the_lock_dies_with_its_holder_not_with_its_forked_workers(tmp_path):
    # a run that forked a worker (as a DataLoader does) and was killed: the orphan, alive for
    # seconds more, must not keep --out locked, or the rerun right after the kill is refused
    code = ("import os, sys, time, prism\n"
            "with prism.exclusive_out(sys.argv[1]):\n"
            "    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\n"
            "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=HERE, check=True, timeout=300)
    with prism.exclusive_out(tmp_path):
        pass


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    import fcntl

    with open(tmp_path / ".prism.lock", "a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = run_main(["--smoke", "--out", str(tmp_path)], capsys)
        assert code == 2
        one_line(err, f"prism: error: {tmp_path} is in use by another prism run")
        assert not (tmp_path / "synthetic").exists()
    assert run_main(["--smoke", "--out", str(tmp_path), "--epochs", "0"], capsys)[0] == 0  # released: it runs


def test_a_failure_is_one_line_debug_shows_the_traceback_and_out_of_memory_names_the_batch_flags(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prism, "build_prompts", lambda *args, **kwargs: 1 / 0)
    code, err = run_main(["--smoke", "--out", str(tmp_path / "a")], capsys)
    assert code == 1
    one_line(err, "prism: failed: ZeroDivisionError: division by zero (rerun with --debug")
    code, err = run_main(["--smoke", "--out", str(tmp_path / "a"), "--debug"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("prism: failed:")
    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(prism, "decode_to_unit", out_of_memory)
    code, err = run_main(["--smoke", "--out", str(tmp_path / "b")], capsys)
    assert code == 1
    one_line(err, "prism: failed: out of GPU memory; rerun the same command with a smaller --gen-batch")


def refuse(image):
    """A transform that refuses every image, as a loader worker refuses a damaged cached image."""
    raise prism.UsageError("an image is damaged; rerun with --overwrite")


def test_a_usage_error_in_a_loader_worker_is_one_line_of_its_own_text(image_dir, capsys):
    with prism.errors_reported([]) as status:  # the worker's error comes back with its traceback
        next(iter(torch.utils.data.DataLoader(prism.image_folder(image_dir, refuse), num_workers=1)))
    assert status.code == 2 and capsys.readouterr().err == "prism: error: an image is damaged; rerun with --overwrite\n"


def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "prism.py", "--smoke", "--out", str(out), "--gen-batch", "1"],
                               cwd=HERE, env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("synthetic/*/*.png"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "prism: interrupted: rerun the same command to resume"
    assert prism.main(["--smoke", "--out", str(out)]) == 0 and leftovers(out) == []
    early = subprocess.Popen([sys.executable, "prism.py", "--smoke", "--out", str(out)], cwd=HERE, env=OFFLINE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # most likely still importing torch (or, on a fast machine, just past it)
    early.send_signal(signal.SIGINT)
    _, err = early.communicate(timeout=120)
    assert early.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "prism: interrupted: rerun the same command to resume"


def test_random_kills_then_a_rerun_give_the_uninterrupted_result(tmp_path):
    """SIGKILL at seeded random points, again and again, then run to the end: the same images,
    student and results as one uninterrupted run, and no temp file left. A point is a
    random moment after the start, or the moment the k-th image (k random) or the first
    checkpoint appears; kills land during synthesis and during distillation."""
    out, rng = tmp_path / "killed", random.Random(7)
    argv = [sys.executable, "prism.py", "--smoke", "--out", str(out), "--gen-batch", "3", "--epochs", "3"]
    points = [("image", k) for k in sorted(rng.sample(range(1, 15), 3))]  # in the order a run meets them
    for _ in range(3):
        points.insert(rng.randint(0, len(points)), ("seconds", rng.uniform(0.5, 4.0)))
    points += [("checkpoint", 1), ("checkpoint", 2)]
    phases = set()

    def reached(kind, value, started):
        if kind == "seconds":
            return time.monotonic() - started > value
        if kind == "image":
            return len(list(out.glob("synthetic/*/*.png"))) >= value
        try:
            return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] >= value
        except Exception:  # none yet
            return False

    for kind, value in points:
        process = subprocess.Popen(argv, cwd=HERE, env=OFFLINE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started = time.monotonic()
        while process.poll() is None and not reached(kind, value, started):
            time.sleep(0.005)
        process.kill()
        process.wait()
        images = len(list(out.glob("synthetic/*/*.png")))
        phases.add("synthesis" if 0 < images < 16 else "distillation" if (out / "checkpoint.pt").exists()
                   and not (out / "student.pt").exists() else "other")
    assert {"synthesis", "distillation"} <= phases
    assert prism.main(["--smoke", "--out", str(out), "--epochs", "3"]) == 0
    reference = tmp_path / "uninterrupted"
    assert prism.main(["--smoke", "--out", str(reference), "--epochs", "3"]) == 0
    same_images(tree(out / "synthetic"), tree(reference / "synthetic"))
    got, expected = (torch.load(d / "student.pt", weights_only=True) for d in (out, reference))
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-4, rtol=1e-4)
    results = [json.loads((d / "results.json").read_text()) for d in (out, reference)]
    np.testing.assert_allclose(results[0]["distill"]["kd_loss"], results[1]["distill"]["kd_loss"], rtol=1e-4)
    assert leftovers(out) == []


def test_full_disk_exits_2_and_keeps_what_was_written(pipe_dir, tmp_path):
    argv = local_models_argv(tmp_path, pipe_dir)
    out = tmp_path / "out"
    assert prism.main(argv + ["--max-new-images", "3"]) == 0

    def snapshot():
        return {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    for step, extra in (("synthesis", []), ("distillation", None)):
        if extra is None:  # finish synthesis and one epoch, then ask for a second (new run: --overwrite)
            assert prism.main(argv) == 0
            before, extra = snapshot(), ["--epochs", "2", "--overwrite"]
        # a disk that takes no file over 1000 bytes: an image or a checkpoint is bigger
        result = subprocess.run([sys.executable, "prism.py", *argv, *extra], cwd=HERE, capture_output=True,
                                text=True, timeout=600, env=OFFLINE, preexec_fn=lambda: resource.setrlimit(
                                    resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY)))
        assert result.returncode == 2, (step, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("prism: error: cannot write") and "File too large" in last, (step, last)
        assert "Traceback" not in result.stderr
        assert snapshot() == before, step  # nothing written before is lost or changed, no temp file left


LATE_RANK = """
import sys, time
from datetime import timedelta
sys.path.insert(0, sys.argv[1])
import prism
prism.init_distributed("cpu", timeout=timedelta(seconds=2))
rank = prism.rank_and_world()[0]
time.sleep(4.5 if rank == 1 else 0)  # rank 1's share of the images takes longer
prism.barrier()
prism.on_rank_zero(lambda: time.sleep(4.5))  # rank 0 alone builds the prompts
sys.stdout.write(f"{rank} {prism.gather_from_ranks([rank + 1])}\\n")  # one write: no interleaving
prism.dist.destroy_process_group()  # as main() does: gloo's threads end before the process
"""


def test_ranks_late_by_more_than_the_collective_timeout_still_meet(tmp_path):
    """Waits that scale with the work are not bounded by the collective timeout (2 s here)."""
    (tmp_path / "late.py").write_text(LATE_RANK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(tmp_path / "late.py"), str(HERE)],
                            capture_output=True, text=True, timeout=120, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(result.stdout.split("\n")) == ["", "0 [[1], [2]]", "1 [[1], [2]]"]


def test_torchrun_global_batch_must_split_over_the_processes(tmp_path):
    result = torchrun_two_processes(["--smoke", "--out", str(tmp_path / "out"), "--batch-size", "7"])
    assert result.returncode != 0  # torchrun's own code: a worker failed
    for rank in (0, 1):  # every rank says it in one line of its own, before any work
        assert f"prism: error (rank {rank}): --batch-size 7 is global: it must be a multiple of the 2 processes\n" \
            in result.stderr
    assert not (tmp_path / "out" / "synthetic").exists()


def linear_student():
    """A student without BatchNorm: its gradient over a batch is the mean of per-image gradients."""
    return prism.seeded(3, lambda: prism.with_preprocessing(
        nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4)), 32))


def distill_and_evaluate(rank, world, folder, teacher, results):
    """One rank of a gloo group (torch.multiprocessing): distill and evaluate, rank 0 saves the outcome."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{results}.rendezvous", rank=rank,
                                         world_size=world)
    student = linear_student()
    history = prism.distill(teacher, student, folder, epochs=3, **dict(DISTILL, lr=0.5))
    outcome = {"history": history, "student": student.state_dict(), "rank": rank,
               "evaluation": prism.evaluate(ChannelMeans(), folder, image_size=16, num_workers=0, progress=False)}
    torch.save(outcome, f"{results}.rank{rank}")
    torch.distributed.destroy_process_group()


def test_ddp_with_global_batch_equals_one_process(teacher, tmp_path):
    """Plain-colour images are unchanged by crops and flips, so with a BatchNorm-free student two
    DDP ranks (each half of every global batch) must follow exactly the one-process trajectory."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "colours"
    for n in range(17):  # 17: evaluation shares of 9 and 8; 3 folders for ChannelMeans (the teacher has 4 outputs)
        (folder / f"{n % 3:04d}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), tuple(int(v) for v in rng.integers(0, 256, 3))).save(folder / f"{n % 3:04d}/{n}.png")
    torch.multiprocessing.spawn(distill_and_evaluate, args=(2, folder, teacher, str(tmp_path / "two")), nprocs=2)
    two = [torch.load(f"{tmp_path / 'two'}.rank{rank}", weights_only=True) for rank in (0, 1)]

    student = linear_student()
    history = prism.distill(teacher, student, folder, epochs=3, **dict(DISTILL, lr=0.5))
    for outcome in two:  # both ranks end with the same weights and the same loss history
        np.testing.assert_allclose(outcome["history"], history, rtol=1e-5)
        for name, value in student.state_dict().items():
            torch.testing.assert_close(outcome["student"][name], value, atol=1e-5, rtol=1e-5)
        assert outcome["evaluation"] == prism.evaluate(ChannelMeans(), folder, image_size=16, num_workers=0,
                                                       progress=False)
    assert student.state_dict()["1.2.weight"].sub(linear_student().state_dict()["1.2.weight"]).abs().max() > 1e-2


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART III — TOOLS: reports, --check-guidance and the benchmark
# ══════════════════════════════════════════════════════════════════════════════════════════


# ── reports: the contact sheet ───────────────────────────────────────────────────────────────
def test_contact_sheet_has_a_row_per_class_and_a_tile_per_image(image_dir, tmp_path):
    prism.contact_sheet(image_dir, tmp_path / "sheet.png", per_row=4, tile=20)
    with Image.open(tmp_path / "sheet.png") as sheet:  # 4 rows of 4 tiles of 20, 2-pixel borders
        assert sheet.format == "PNG" and sheet.size == (2 + 4 * 22, 2 + 4 * 22)
        pixels = np.asarray(sheet.convert("RGB"))
    first = sorted((image_dir / "0001").iterdir())[0]  # row 1, column 0
    expected = np.asarray(Image.open(first).convert("RGB").resize((20, 20)))
    assert np.array_equal(pixels[24:44, 2:22], expected)
    prism.contact_sheet(image_dir, tmp_path / "two.png", max_classes=2, per_row=8, tile=20)
    with Image.open(tmp_path / "two.png") as sheet:  # classes 0 and 3, all 6 images of each
        assert sheet.size == (2 + 6 * 22, 2 + 2 * 22)
        last = np.asarray(sheet.convert("RGB"))[24:44, 2:22]
    assert np.array_equal(last, np.asarray(Image.open(sorted((image_dir / "0003").iterdir())[0]).resize((20, 20))))


# ── --check-guidance: the measurement a user runs on real weights ────────────────────────────
def test_check_guidance_numbers_equal_a_direct_computation(pipe, teacher):
    start, ids = latents(4), [0, 1, 2, 3]
    result = prism.check_guidance(pipe, teacher, PROMPTS, ids, start, class_names=NAMES, **SAMPLE)
    modes = {row["mode"]: row for row in result["modes"]}
    assert list(modes) == ["unguided", "guided, approx (default)", "guided, exact"]
    _, unguided = prism.energy_guided_sample(pipe, teacher, PROMPTS, ids, latents=start,
                                             **dict(SAMPLE, energy_scale=0.0, class_scale=0.0))
    assert modes["unguided"]["energy"] == pytest.approx(unguided["energy"].mean().item(), rel=1e-5)
    assert modes["unguided"]["top1"] == pytest.approx(100 * (unguided["top1"] == torch.tensor(ids)).float().mean())
    assert modes["guided, approx (default)"]["energy"] < modes["unguided"]["energy"]
    assert [r["step"] for r in result["fidelity"]] == [0, 5, 9]  # early, middle, late
    noisy, t, alpha_bar = state_on_a_trajectory(pipe, teacher, step=5)
    objective = dict(energy_scale=0.25, class_scale=0.25, temperature=1.0)
    direct = cosines(direct_gradient(pipe, teacher, noisy, t, alpha_bar, exact=True, objective=objective),
                     direct_gradient(pipe, teacher, noisy, t, alpha_bar, exact=False, objective=objective))
    assert result["fidelity"][1]["cosine_mean"] == pytest.approx(direct.mean().item(), abs=1e-4)
    assert result["fidelity"][1]["cosine_min"] == pytest.approx(direct.min().item(), abs=1e-4)
    per_class = {row["name"]: row for row in result["per_class"]}
    assert per_class["kite"]["unguided"]["energy"] == pytest.approx(unguided["energy"][2].item(), rel=1e-5)
    _, guided = prism.energy_guided_sample(pipe, teacher, PROMPTS, ids, latents=start, **SAMPLE)
    assert per_class["kite"]["guided"]["energy"] == pytest.approx(guided["energy"][2].item(), rel=1e-5)


def test_check_guidance_command_writes_its_tables(tmp_path, capsys):
    out = tmp_path / "check"
    assert prism.main(["--smoke", "--check-guidance", "--out", str(out)]) == 0
    result = json.loads((out / "check_guidance.json").read_text())
    assert [row["mode"] for row in result["modes"]] == list(prism.SAMPLING_MODES)
    assert len(result["per_class"]) == 4 and all(row["images"] == 2 for row in result["per_class"])
    table = (out / "check_guidance.md").read_text()
    assert table.count(" of 10 |") == 3 and "| guided, exact |" in table and "| 3 tank | 2 |" in table
    assert "cosine of the exact gradient with the method's g" in capsys.readouterr().out


# ── benchmark (plumbing only: timings are machine-dependent and never asserted) ─────────────
def test_benchmark_times_every_mode_and_the_kd_loop_and_writes_its_tables(tmp_path, capsys):
    out = tmp_path / "bench"  # --smoke: the tiny random models in place of SD 1.5 and the resnets
    assert prism.main(["--smoke", "--benchmark", "--device", "cpu", "--out", str(out), "--height", "32",
                       "--width", "32", "--steps", "3", "--gen-batch", "2", "--batch-size", "4", "--image-size",
                       "32", "--workers", "0", "--image-format", "jpg"]) == 0
    result = json.loads((out / "benchmark.json").read_text())
    rows = result["sampling"]
    assert [row["mode"] for row in rows] == ["unguided", "guided, approx (default)", "guided, exact"]
    assert rows[0]["vs_unguided"] == 1.0
    for row in rows:
        assert row["s_per_image"] > 0 and "peak_memory_gib" not in row and np.isfinite(row["energy"])  # CPU
        assert row["vs_unguided"] == pytest.approx(row["s_per_image"] / rows[0]["s_per_image"])
    kd = {row["part"].split(" (")[0]: row for row in result["distill"]}
    assert list(kd) == ["loader alone", "full KD loop", "pure compute"] and kd["pure compute"]["vs_compute"] == 1
    for row in kd.values():
        assert row["vs_compute"] == pytest.approx(row["images_per_s"] / kd["pure compute"]["images_per_s"])
    assert len(list((out / "benchmark" / "images").glob("*/*.jpg"))) == 32  # the stored format, 8 batches
    table = (out / "benchmark.md").read_text()
    assert table.count("\n| guided") == 2 and "| loader alone (0 workers" in table and "peak memory" not in table
    assert "| full KD loop (loader + copy + compute) |" in table and table in capsys.readouterr().out + "\n"
