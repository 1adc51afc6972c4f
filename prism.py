r"""PRISM: data-free knowledge distillation with a text-to-image diffusion model.

A single-file reference implementation of "Precision-Recall Informed Data-Free Knowledge
Distillation via Generative Diffusion" (arXiv 2509.16897). A teacher classifier f_T is distilled
into a student f_S using only images that Stable Diffusion makes; two ideas steer them:
precision (images on the teacher's in-distribution manifold: §1-2) and recall (images spread
over that manifold: §3). The formulation below is ours, built from the paper's abstract and the
literature it rests on (the README lists our choices).

    python prism.py --teacher resnet50 --data imagenet     # the real run (GPU)
    python prism.py --smoke --out /tmp/prism-smoke          # offline plumbing check on a CPU

Notation
    x           an image in [0, 1];  y its intended class;  C classes
    f_T, f_S    teacher and student logits
    E           the teacher's energy;  τ its temperature (--energy-temperature, 1)
    L           the guidance loss;  s_E, s_C its weights (--energy-scale, --class-scale)
    z_t         the latent at sampling step t of T (--steps);  D the VAE decoder
    ᾱ_t         the scheduler's cumulative signal fraction at t
    ε̂           the noise prediction;  w the classifier-free guidance scale (--cfg)
    ẑ0          Tweedie's estimate of the clean latent;  g the guidance gradient
    τ_kd        the distillation temperature (--kd-temperature)

§1 The teacher's energy (Liu et al., NeurIPS 2020): low on what f_T finds in-distribution.
        E(x) = -τ · logsumexp(f_T(x) / τ)
        L(x, y) = s_E · E(x) + s_C · CE(f_T(x), y)
§2 Energy-guided sampling (classifier guidance, Dhariwal & Nichol 2021, on Tweedie's ẑ0).
        ε̂  = ε_uncond + w · (ε_text − ε_uncond)            (v-prediction converted to ε)
        ẑ0 = (z_t − sqrt(1 − ᾱ_t) · ε̂) / sqrt(ᾱ_t)
        g  = ∇_{z_t} L(D(ẑ0(z_t)), y)                      approx: ε̂ held constant
        ε̂' = ε̂ + sqrt(1 − ᾱ_t) · g                         then the scheduler's own step
   g is rescaled per sample to (s_E + s_C)·‖ε̂‖, inside a window of steps. With s_E = s_C = 0
   the sampler is diffusers' StableDiffusionPipeline, exactly.
§3 Diversified prompts: disambiguated names (the teacher's nearest classes tell the sense),
   varied content and style.
        prompt(c, i) = "{style} of {name of c}, {description}, {scene}"
§4 Knowledge distillation (Hinton et al., 2015), teacher and student on the same batch.
        L_KD = τ_kd² · KL(softmax(f_T(x)/τ_kd) ‖ softmax(f_S(x)/τ_kd))
§5 Precision and recall of the synthetic set (Kynkäänniemi et al., NeurIPS 2019): the share of
   synthetic features inside the k-NN balls of real ones, and the reverse, in the teacher's
   penultimate features; then the student's top-1/top-5 on real test sets.

Part I: the method in data-flow order, its values as keyword defaults; Part II: plumbing, which
changes nothing computed; Part III: tools. Copying energy_guided_sample, distill or
precision_recall takes along only UsageError, RunFailure and rank_and_world."""
import contextlib
import copy
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

# Ctrl-C while the libraries below load (seconds): one line, not a traceback
if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write(
        "prism: interrupted: rerun the same command to resume\n"), os._exit(130)))
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART I — THE METHOD (§1-§5), in the order data flows
# ══════════════════════════════════════════════════════════════════════════════════════════
# ── The equations (§1, §2, §4), one small function each ───────────────────────────────────────────
def teacher_energy(logits, temperature=1.0):
    """The teacher's energy of each sample (§1, Liu et al. 2020): low on what it finds familiar."""
    # E(x) = -τ · logsumexp(f_T(x) / τ)
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def guidance_loss(logits, class_ids, *, energy_scale, class_scale, temperature=1.0):
    """The guidance loss L(x, y) of §1 per sample: energy (precision) plus the cross-entropy of
    the intended class y, weighted by s_E = `energy_scale` and s_C = `class_scale`."""
    # L(x, y) = s_E · E(x) + s_C · CE(f_T(x), y)
    loss = energy_scale * teacher_energy(logits, temperature)
    if class_scale:
        loss = loss + class_scale * F.cross_entropy(logits, class_ids, reduction="none")
    return loss


def to_epsilon(model_output, noisy_latents, alpha_bar, prediction_type):
    """The model's prediction as ε (§2), whether it predicts ε or v (v-prediction)."""
    if prediction_type == "epsilon":
        return model_output
    # ε = sqrt(ᾱ)·v + sqrt(1 - ᾱ)·z_t
    return alpha_bar ** 0.5 * model_output + (1 - alpha_bar) ** 0.5 * noisy_latents


def from_epsilon(epsilon, noisy_latents, alpha_bar, prediction_type):
    """Inverse of to_epsilon: the model output the scheduler expects, from ε."""
    if prediction_type == "epsilon":
        return epsilon
    # v = (ε - sqrt(1 - ᾱ)·z_t) / sqrt(ᾱ)
    return (epsilon - (1 - alpha_bar) ** 0.5 * noisy_latents) / alpha_bar ** 0.5


def alpha_bar_at(scheduler, timestep):
    """ᾱ_t of the scheduler's current step. Sigma-based schedulers (Euler, DPM-Solver) step on
    σ, possibly between the trained timesteps; the others index alphas_cumprod."""
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is not None and index is not None:
        # σ² = (1 - ᾱ) / ᾱ, so ᾱ = 1 / (1 + σ²)
        return 1.0 / (1.0 + float(sigmas[index]) ** 2)
    return float(scheduler.alphas_cumprod[int(timestep)])


def cfg_prediction(unet, noisy_latents, timestep, text, uncond, cfg_scale):
    """The UNet's prediction with classifier-free guidance (§2), the CFG pair in one UNet batch;
    without `uncond` (CFG off) the text-conditioned prediction alone."""
    if uncond is None:
        return unet(noisy_latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
    both = unet(torch.cat([noisy_latents] * 2), timestep,
                encoder_hidden_states=torch.cat([uncond, text]), return_dict=False)[0]
    output_uncond, output_text = both.chunk(2)
    # ε̂ = ε_uncond + w·(ε_text - ε_uncond)
    return output_uncond + cfg_scale * (output_text - output_uncond)


def tweedie_clean_latent(noisy_latents, epsilon, alpha_bar):
    """Tweedie estimate of the clean latent from z_t and the noise prediction (§2)."""
    # ẑ0 = (z_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t)
    return (noisy_latents - (1 - alpha_bar) ** 0.5 * epsilon) / alpha_bar ** 0.5


def decode_to_unit(vae, latents):
    """D(z): SD latents decoded by `vae` to images in [0, 1] (§2)."""
    # the VAE decodes z / scaling_factor to [-1, 1]; x = D / 2 + 1/2, clamped
    images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (images / 2 + 0.5).clamp(0, 1)


def at_least_float32(x):
    """x in float32 if its dtype is narrower (float16, bfloat16); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_sample(values, like):
    """One value per sample, shaped to broadcast over the batch `like`."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def scaled_vjp(outputs, inputs, vectors):
    """vᵀ·∂outputs/∂inputs per sample, in float32 (or wider). Guidance gradients lie below float16's
    normal range, where a float16 backward pass flushes them to zero: each sample's v is scaled by a
    power of two to max|v| in [½, 1), the result scaled back (exact; in float32: autograd.grad)."""
    vectors = at_least_float32(vectors.detach())
    peak = vectors.flatten(1).abs().amax(dim=1)
    # peak = m·2^e with m in [½, 1); v·2^-e has its largest value in [½, 1)
    exponent = per_sample(torch.frexp(peak)[1], vectors)
    scaled = torch.ldexp(vectors, -exponent).to(outputs.dtype)
    grad = torch.autograd.grad(outputs, inputs, grad_outputs=scaled)[0]
    return torch.ldexp(at_least_float32(grad), exponent)


def guidance_gradient(predict_epsilon, vae, teacher, noisy_latents, alpha_bar, class_ids, *,
                      exact=False, batch_size=4, **objective):
    """(ε̂, g) at z_t (§2): ε̂ = predict_epsilon(z_t, rows) of the samples `rows` and, in float32,
    g = ∇_{z_t} L(D(ẑ0(z_t)), y), L with `objective` (guidance_loss's scales and τ). Default: ε̂
    held constant (no UNet backward); `exact`: through the UNet. `batch_size` samples at a time."""
    with torch.no_grad():
        held = None if exact else predict_epsilon(noisy_latents, slice(None))
    epsilons, grads = [], []
    for start in range(0, len(noisy_latents), batch_size):
        rows = slice(start, start + batch_size)
        noisy = noisy_latents[rows].detach().requires_grad_(exact)
        with torch.enable_grad():
            epsilon = predict_epsilon(noisy, rows) if exact else held[rows]
            clean = tweedie_clean_latent(noisy, epsilon, alpha_bar)
            latents = clean.detach().requires_grad_(True)
            images = decode_to_unit(vae, latents)
            pixels = at_least_float32(images.detach()).requires_grad_(True)
            loss = guidance_loss(at_least_float32(teacher(pixels)), class_ids[rows], **objective)
            # ∇_{ẑ0} L(D(ẑ0), y): the teacher's ∇_x L back through the decoder
            clean_grad = scaled_vjp(images, latents, torch.autograd.grad(loss.sum(), pixels)[0])
            # g = (∂ẑ0/∂z_t)ᵀ·∇_{ẑ0} L: through the UNet's ε̂(z_t) if exact, else 1/sqrt(ᾱ_t)
            grads.append(scaled_vjp(clean, noisy, clean_grad) if exact
                         else clean_grad / alpha_bar ** 0.5)
        epsilons.append(epsilon.detach())
    return torch.cat(epsilons), torch.cat(grads)


def apply_guidance(epsilon, grad, alpha_bar, *, total_scale, normalize):
    """(ε̂' = ε̂ + sqrt(1-ᾱ_t)·g (§2), finite): a sample whose g is not finite is left unguided;
    `normalize`: g first rescaled to total_scale·‖ε̂‖. In float32: float16 norms underflow."""
    epsilon32, grad32 = at_least_float32(epsilon), at_least_float32(grad)
    finite = torch.isfinite(grad32.flatten(1)).all(dim=1)
    grad32 = torch.where(per_sample(finite, grad), grad32, 0.0)
    if normalize:
        norm = lambda x: per_sample(x.flatten(1).norm(dim=1), x)  # noqa: E731
        # g/‖g‖ computed as u/‖u‖ with u = g/max|g|, which cannot underflow; a zero g stays zero
        peak = grad32.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(grad32.dtype).tiny)
        unit = grad32 / per_sample(peak, grad)
        unit = unit / norm(unit).clamp_min(1.0)  # ‖u‖ ≥ 1 unless u = 0
        # g ← (s_E + s_C)·‖ε̂‖·g/‖g‖
        grad32 = total_scale * norm(epsilon32) * unit
    # ε̂' = ε̂ + sqrt(1-ᾱ_t)·g
    return (epsilon32 + (1 - alpha_bar) ** 0.5 * grad32).to(epsilon.dtype), finite


def kd_loss(student_logits, teacher_logits, temperature=10.0):
    """Hinton et al.'s KD loss (2015, §4), batch mean; τ_kd² keeps gradients alike across τ_kd."""
    # L_KD = τ_kd² · KL(softmax(f_T/τ_kd) ‖ softmax(f_S/τ_kd))
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, dim=-1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2


# ── Stage 1. Diversified prompts (§3): "{style} of {name}, {description}, {scene}" ────────────────
# Style diversification. Photos serve accuracy on photos; the rest serve domain generalisation.
PHOTO_STYLES = ("a photo", "a close-up photo", "a DSLR photo", "a wide-angle photo",
                "a candid photo", "a professional photo", "a snapshot", "a slightly blurry photo",
                "a black and white photo", "a low-light photo", "a high-resolution photo",
                "a cropped photo", "a phone photo", "a macro photo", "a telephoto photo",
                "a vintage photo")
OTHER_STYLES = ("a pencil sketch", "an oil painting", "a watercolor painting", "a cartoon",
                "a 3D render", "an embroidery", "a plastic toy", "a clay sculpture", "a tattoo",
                "an origami model", "a pixel-art image", "a graffiti", "a woodcut print",
                "a plush toy", "a video game screenshot", "a children's drawing")
# Content without an LLM: views and light that suit any class.
SCENES = ("in soft natural light", "close up", "seen from the side", "in bright daylight",
          "seen from a distance", "in warm evening light", "on an overcast day", "seen from above")


def names_any(text, names, own=""):
    """True if `text` names one of `names` as whole words (any case, plurals too) once the class's
    `own` name is out: SD would draw another class. "ant" is not in "elephant"."""
    text = re.sub(rf"\b{re.escape(own)}\b", " ", text, flags=re.IGNORECASE) if own else text
    # a name's words apart by anything but a word character, plurals too: kites, foxes
    return any(re.search(r"(?<![\w'-])%s(?:e?s)?(?![\w'-])" % r"[^\w'-]+".join(
        map(re.escape, name.split())), text, re.IGNORECASE) for name in names)


def last_linear_module(model):
    """A classifier's head, the last nn.Linear of `model`, or None."""
    return next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)


def neighbour_names(class_names, teacher, k):
    """For each class c, the k classes j ≠ c of largest cos(w_c, w_j), w the teacher head's rows
    (§3): the sense of an ambiguous name, data-free (mouse → computer keyboard); [] without one."""
    head = last_linear_module(teacher) if teacher is not None and k > 0 else None
    if head is None or head.weight.shape[0] != len(class_names):
        return [[] for _ in class_names]
    unit = F.normalize(head.weight.detach().float(), dim=1)
    # cos(w_c, w_j), j ≠ c
    nearest = (unit @ unit.T).fill_diagonal_(-math.inf).topk(min(k, len(unit) - 1)).indices
    return [[class_names[j] for j in row] for row in nearest.tolist()]


def llm_questions(name, neighbours, scenes_per_class):
    """The LLM's two questions about a class (§3), what it is and where it is seen, the teacher's
    neighbours in them only, to tell which sense is meant."""
    sense = f" (the sense close to {' and '.join(neighbours)})" if neighbours else ""
    describe = (f"An image classifier has a class named '{name}'{sense}. In at most 8 words, say "
                f"what a '{name}' is, as a noun phrase. Do not name other things it is near. "
                f"Answer with the noun phrase alone.")
    scenes = (f"List {scenes_per_class} different scenes in which a photo of a '{name}'{sense} "
              f"is really taken: where it is seen, with what, from which viewpoint, in which "
              f"light. One scene per line, at most 12 words each, no numbering, nothing else.")
    return describe, scenes


def build_prompts(class_names, per_class, *, teacher=None, descriptions=None, llm=None,
                  answers=None, neighbours=2, photo_share=0.8, seed=0, scenes_per_class=12,
                  llm_device="cpu", disambiguate=True, vary_content=True, vary_style=True):
    """(prompts, classes) of §3, `per_class` prompts a class, deterministic for a seed:
        prompt(c, i) = "{style} of {name of c}, {description}, {scene}"   (empty parts left out)
    `llm` (a name or (model, tokenizer); `answers` its cache), told a name's sense by the teacher's
    `neighbours` nearest classes, says what a class is (unless `descriptions` do) and where it is
    seen (else SCENES). classes[c]: each part, its "source" and "scene_source", the "prompts"."""
    if not disambiguate:
        descriptions, neighbours = None, 0
    near = neighbour_names(class_names, teacher, neighbours)
    scenes = [s for s in SCENES if not names_any(s, class_names)] if vary_content else []
    classes = [{"name": name, "description": d, "source": "file" if d else "name",
                "neighbours": n, "scenes": scenes, "scene_source": "built-in" if scenes else "none"}
               for name, d, n in zip(class_names, descriptions or [""] * len(class_names), near)]
    if llm is not None:
        asked = [llm_questions(e["name"], e["neighbours"], scenes_per_class) for e in classes]
        todo = [c for c, entry in enumerate(classes) if disambiguate and entry["source"] != "file"]
        answers = {} if answers is None else answers
        described, llm = ask_llm(llm, [asked[c][0] for c in todo], answers, device=llm_device,
                                 max_new_tokens=48)  # room for a chat preamble
        listed, _ = ask_llm(llm, [q[1] for q in asked if vary_content], answers,
                            max_new_tokens=32 * scenes_per_class, device=llm_device)
        for c, answer in zip(todo, described):
            for description in answer_phrases(answer, classes[c])[:1]:
                classes[c].update(description=description, source="llm")
        for entry, answer in zip(classes, listed):
            scenes = answer_phrases(answer, entry)[:scenes_per_class]
            entry.update({"scenes": scenes, "scene_source": "llm"} if scenes else {})
    for c, entry in enumerate(classes):
        # a photo style with probability `photo_share`, then the next (style, scene) pair of that
        # kind from the class's shuffled list of them all: no repeat before every pair is used
        rng = random.Random(f"prism-prompts/{seed}/{c}")  # str seeds are stable across runs
        article = "an " if entry["name"][:1].lower() in "aeiou" else "a "  # as CLIP's captions
        subject = ", ".join(filter(None, (article + entry["name"], entry["description"])))
        pools = []
        for styles in (PHOTO_STYLES, OTHER_STYLES) if vary_style else (("a photo",),) * 2:
            pairs = [(style, scene) for scene in entry["scenes"] or [""] for style in styles]
            rng.shuffle(pairs)
            pools.append(itertools.cycle(pairs))
        pairs = [next(pools[0] if rng.random() < photo_share else pools[1])
                 for _ in range(per_class)]
        entry["prompts"] = [", ".join(filter(None, (f"{style} of {subject}", scene)))
                            for style, scene in pairs]
    return [entry["prompts"] for entry in classes], classes


# ── Stage 2. Energy-guided sampling (§1-2): the teacher's energy steers the sampler ───────────────
def guided_step_indices(num_steps, start, end, every):
    """Indices i of the sampling steps that get guidance: start ≤ i / num_steps < end, every k-th.
    `num_steps` is the scheduler's own count of timesteps (PNDM makes one more than asked)."""
    first, last = math.ceil(start * num_steps), min(num_steps, math.ceil(end * num_steps))
    return set(range(first, last, every))


def denoise(pipe, teacher, latents, text, uncond, class_ids, *, generator, cfg_scale, guided_steps,
            exact_grad, normalize_grad, guidance_batch, trace, **objective):
    """The sampling loop (§2); on `guided_steps` ε̂ becomes ε̂' before the scheduler's own step.
    Returns (final latents, per sample the guided steps whose g was not finite)."""
    scheduler, unet, kind = pipe.scheduler, pipe.unet, pipe.scheduler.config.prediction_type
    step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
    skipped = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
    for i, t in enumerate(scheduler.timesteps):
        # the UNet sees scale_model_input(latents): the variance-preserving z_t for every scheduler
        noisy = scheduler.scale_model_input(latents, t)
        if i in guided_steps:
            alpha_bar = alpha_bar_at(scheduler, t)

            def predict(z, rows, t=t, alpha_bar=alpha_bar):  # ε̂ of the samples `rows` at z
                pair = (text[rows], None if uncond is None else uncond[rows])
                return to_epsilon(cfg_prediction(unet, z, t, *pair, cfg_scale), z, alpha_bar, kind)
            # ε̂ and g = ∇_{z_t} L(D(ẑ0(z_t)), y)
            epsilon, grad = guidance_gradient(predict, pipe.vae, teacher, noisy, alpha_bar,
                                              class_ids, exact=exact_grad,
                                              batch_size=guidance_batch, **objective)
            # ε̂' = ε̂ + sqrt(1 - ᾱ_t)·g
            total_scale = objective["energy_scale"] + objective["class_scale"]  # s_E + s_C
            guided, finite = apply_guidance(epsilon, grad, alpha_bar, total_scale=total_scale,
                                            normalize=normalize_grad)
            output, skipped = from_epsilon(guided, noisy, alpha_bar, kind), skipped + ~finite
            if trace is not None:  # for check_guidance: the states where g was taken
                trace.append({"step": i, "timestep": t, "alpha_bar": alpha_bar, "predict": predict,
                              "noisy": noisy.detach().clone(), "grad": grad.detach().clone()})
        else:
            with torch.no_grad():
                output = cfg_prediction(unet, noisy, t, text, uncond, cfg_scale)
        latents = scheduler.step(output.detach(), t, latents, **step_kwargs, return_dict=False)[0]
    return latents, skipped


def latent_shape(pipe, height=None, width=None):
    """(channels, h, w) of one latent for images of height × width (default: the model's size)."""
    factor, config = pipe.vae_scale_factor, pipe.unet.config
    size = config.sample_size * factor
    return config.in_channels, (height or size) // factor, (width or size) // factor


@torch.no_grad()
def energy_guided_sample(pipe, teacher, prompts, class_ids, *, latents=None, generator=None,
                         num_steps=50, cfg_scale=3.0, energy_scale=0.25, class_scale=0.25,
                         guidance_start=0.1, guidance_end=0.7, guidance_every=2,
                         exact_grad=False, normalize_grad=True, temperature=1.0, height=None,
                         width=None, guidance_batch=4, trace=None):
    """One image per prompt from a diffusers StableDiffusionPipeline, steered by the teacher (§2)
    on the steps in [guidance_start, guidance_end), every k-th (both scales 0: exactly pipe's own).
    Returns [0, 1] float32 images and per image the teacher's "energy", "top1", "p_class", the
    "guidance_skipped" steps (g not finite), "resampled_unguided" (NaN, remade from its noise)."""
    scheduler, device = pipe.scheduler, pipe.device
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the model's own image size
    class_ids = torch.as_tensor(class_ids, device=device)
    # the same preparation as StableDiffusionPipeline.__call__, through its own methods; CFG is
    # off for w ≤ 1 or a UNet distilled to take w as an input
    do_cfg = cfg_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    text, uncond = pipe.encode_prompt(prompts, device, 1, do_cfg)
    uncond = uncond if do_cfg else None
    scheduler.set_timesteps(num_steps, device=device)
    start = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, height or size,
                                 width or size, text.dtype, device, generator, latents)
    noise_states = [g.get_state() for g in generator] if isinstance(generator, list) else None
    guided_steps = set() if not (energy_scale or class_scale) else guided_step_indices(
        len(scheduler.timesteps), guidance_start, guidance_end, guidance_every)
    loop = dict(cfg_scale=cfg_scale, exact_grad=exact_grad, normalize_grad=normalize_grad,
                guidance_batch=guidance_batch, trace=trace, energy_scale=energy_scale,
                class_scale=class_scale, temperature=temperature)
    final, skipped = denoise(pipe, teacher, start, text, uncond, class_ids, generator=generator,
                             guided_steps=guided_steps, **loop)
    images = decode_to_unit(pipe.vae, final).float()
    resampled = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if resampled.any() and guided_steps:  # guidance overflowed (e.g. in float16): redo unguided
        rows = resampled.nonzero().flatten().tolist()
        noise = generator if noise_states is None else [  # each image's step noise, from its
            torch.Generator(generator[k].device).set_state(noise_states[k]) for k in rows]  # start
        scheduler.set_timesteps(num_steps, device=device)
        redone, _ = denoise(pipe, teacher, start[rows], text[rows],
                            None if uncond is None else uncond[rows], class_ids[rows],
                            generator=noise, guided_steps=set(), **loop)
        images[rows] = decode_to_unit(pipe.vae, redone).float()
    logits = at_least_float32(teacher(images))
    return images, {"energy": teacher_energy(logits, temperature), "top1": logits.argmax(dim=-1),
                    "p_class": logits.softmax(-1).gather(1, class_ids.view(-1, 1)).squeeze(1),
                    "guidance_skipped": skipped, "resampled_unguided": resampled}


# ── Stage 3. The synthetic set: every image made once, with its seed and teacher scores ───────────
def derived_seed(*parts):
    """A 63-bit seed hashed from `parts`: an independent stream per (purpose, seed, ...) tuple."""
    digest = hashlib.sha256("/".join(["prism", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def image_seed(seed, class_index, image_index):
    """The seed of image (class, index): each image can be made alone, in any batch or process."""
    return derived_seed(seed, class_index, image_index)


def initial_latents(seeds, shape):
    """One N(0, I) latent of `shape` per seed, drawn on the CPU: the same noise on every device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def synthesize_dataset(pipe, teacher, prompts, out_dir, *, per_class, seed=0, batch_size=8,
                       image_format="png", store_size=None, identity=None, overwrite=False,
                       max_new_images=None, progress=True, guidance_batch=4, **sample_kwargs):
    """Makes the missing images (at most `max_new_images`) of the ImageFolder `out_dir` and returns
    its files: image (c, i) is energy_guided_sample of prompts[c][i] from image_seed(seed, c, i).
    settings.json holds what decides the pixels (`identity`: the models'); others are a UsageError
    unless `overwrite`. Under torchrun the ranks share the work."""
    rank, world = rank_and_world()
    out_dir, num_classes = Path(out_dir), len(prompts)
    settings = {"per_class": per_class, "seed": seed, "image_format": image_format,  # not the
                "store_size": store_size, **(identity or {}), **sample_kwargs,  # batch size
                "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    out_dir.mkdir(exist_ok=True)
    same = check_settings(out_dir / "settings.json", settings, overwrite=overwrite,
                          what="synthetic images")
    if not (same or overwrite) and any(out_dir.glob("[0-9]*/*")):  # its settings.json deleted
        raise UsageError(f"{out_dir} holds images but no settings.json: --overwrite remakes them")
    barrier()  # every rank has read the old settings before rank 0 may replace them
    if rank == 0 and not same:  # a new set; killed half way, the old settings stay recorded
        for folder in out_dir.glob("[0-9]*"):  # while an old image (or class) is left
            shutil.rmtree(folder)
        write_json_atomic({"settings": settings}, out_dir / "settings.json")
    barrier()
    width, digits = max(4, len(str(num_classes - 1))), max(5, len(str(per_class - 1)))
    files = {(c, i): f"{c:0{width}}/{i:0{digits}}.{image_format}"  # zero-padded: sorted = order
             for c in range(num_classes) for i in range(per_class)}
    missing = [key for key, f in files.items() if not (out_dir / f).is_file()][:max_new_images]
    barrier()  # every rank has its list of the missing before any image is written
    todo, remade = missing[rank::world], 0
    shape = latent_shape(pipe, sample_kwargs.get("height"), sample_kwargs.get("width"))
    with tqdm(total=len(todo), unit="img", disable=not progress or rank != 0, desc=(
            f"synthesis, rank 0's share of {len(missing)}" if world > 1 else "synthesis")) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            seeds = [image_seed(seed, c, i) for c, i in batch]
            # step noise of stochastic schedulers: a generator per image, batch-independent
            images, stats = energy_guided_sample(
                pipe, teacher, [prompts[c][i] for c, i in batch], [c for c, _ in batch],
                latents=initial_latents(seeds, shape).to(pipe.device, pipe.unet.dtype),
                generator=[torch.Generator().manual_seed(derived_seed("step-noise", s))
                           for s in seeds], guidance_batch=guidance_batch, **sample_kwargs)
            if not torch.isfinite(images).all():  # the model fails even unguided
                raise UsageError("the diffusion model gives non-finite pixels even without "
                                 "guidance: run it in float32 (--dtype float32) or check it")
            remade += int(stats["resampled_unguided"].sum())
            if store_size and min(images.shape[-2:]) > store_size:  # scored at full size, stored
                # at training scale, a fraction of the bytes; clamped: antialiasing overshoots
                images = transforms.functional.resize(images, store_size, antialias=True)
                images = images.clamp(0, 1)
            for k, (c, i) in enumerate(batch):
                (out_dir / files[c, i]).parent.mkdir(exist_ok=True)
                note = {"prompt": prompts[c][i], "seed": seeds[k],
                        **{key: stats[key][k].item() for key in ("energy", "top1", "p_class")}}
                save_image_atomic(images[k], out_dir / files[c, i], strict_json(note))
            bar.update(len(batch))
    if remade:
        report("warning", f"guidance overflowed on {remade} images: made unguided instead "
                          f"(--dtype float32 avoids it)")
    barrier()  # every rank has written its images
    return [file for file in files.values() if (out_dir / file).exists()]


# ── Stage 4. Knowledge distillation (§4): the student matches the teacher's soft outputs ──────────
def read_image(path):
    """The image at `path` in RGB; one that does not decode is a UsageError that names it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # whatever PIL says, the file is damaged (a disk, not prism)
        raise UsageError(f"{path} is damaged ({error}); delete it and rerun the same command "
                         f"(a synthetic image is remade)")


class SeededAugmentation(torch.utils.data.Dataset):
    """Item epoch·N + i of an N-image dataset, augmented with the seed (seed, epoch, i): the same
    crop and flip in any process, worker (they persist across epochs) or resumed run."""

    def __init__(self, images, augment, seed):
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, tagged_index):
        epoch, index = divmod(tagged_index, len(self.images))
        image, label = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed("augment", self.seed, epoch, index))
            return self.augment(image), label


class EpochTaggedSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler whose indices carry their epoch (epoch·N + i) for SeededAugmentation."""

    def __iter__(self):
        return (self.epoch * len(self.dataset) + index for index in super().__iter__())


def kd_loader(data_dir, batch_size, *, image_size=224, crop_scale=0.08, num_workers=0, seed=0,
              pin_memory=False):
    """(loader, sampler) of this rank's share of KD batches from the ImageFolder `data_dir`,
    cropped and flipped, in uint8 (a quarter of float32's bytes). `batch_size` is global; full
    batches only (BatchNorm cannot train on one image); a set smaller than a batch is one batch."""
    rank, world = rank_and_world()
    augment = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1)),
                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    images = torchvision.datasets.ImageFolder(data_dir, loader=read_image)
    dataset = SeededAugmentation(images, augment, seed)
    rank_batch = min(batch_size, len(dataset)) // world
    if rank_batch < 1:
        raise UsageError(f"{data_dir} has {len(dataset)} images, fewer than the {world} processes")
    sampler = EpochTaggedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=rank_batch, sampler=sampler,
                                         drop_last=True, num_workers=num_workers,
                                         persistent_workers=num_workers > 0, pin_memory=pin_memory,
                                         prefetch_factor=4 if num_workers else None)
    return loader, sampler


def to_unit_images(batch, device, memory_format=torch.contiguous_format):
    """A uint8 batch from kd_loader as [0, 1] float images on `device`: x / 255, computed there."""
    return batch.to(device, non_blocking=True).to(memory_format=memory_format).float().div_(255)


def kd_step(teacher, student, optimizer, images, temperature, amp=contextlib.nullcontext()):
    """One KD step (§4) on `images`, both models seeing the same batch; returns the loss."""
    with amp:
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = kd_loss(student(images), teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: gradients averaged over the ranks here
    optimizer.step()
    return loss.detach()


def distill(teacher, student, data_dir, *, epochs, batch_size, lr, temperature=10.0, device="cpu",
            image_size=224, crop_scale=0.08, weight_decay=1e-4, momentum=0.9, num_workers=0,
            seed=0, channels_last=False, progress=True, resume=None, stop_after=None,
            on_epoch=None):
    """Trains `student` in place by KD from `teacher` (§4) on `data_dir`; returns each epoch's mean
    KD loss. `batch_size`, `lr`: global (torchrun: DDP). `on_epoch(state)` after each epoch; given
    back as `resume`, the state goes on as if never stopped (randomness derives from (seed, epoch,
    image)). `stop_after` epochs end the call; a non-finite loss, weight or output: RunFailure."""
    rank, world = rank_and_world()
    device = torch.device(device)
    loader, sampler = kd_loader(data_dir, batch_size, image_size=image_size, seed=seed,
                                crop_scale=crop_scale, num_workers=num_workers,
                                pin_memory=device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher.to(device, memory_format=memory_format).eval()
    model = student.to(device, memory_format=memory_format).train()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None)
    # SGD with Nesterov momentum, lr_t = lr · ½(1 + cos(π t / T)) per step (our choices)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * len(loader)))))
    state = {"epoch": 0, "history": [], "epoch_seconds": []}
    if resume is not None:
        for part, saved in ((student, "student"), (optimizer, "optimizer"), (schedule, "schedule")):
            part.load_state_dict(resume[saved])
        state = {key: copy.deepcopy(resume.get(key, [])) for key in state}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(state["epoch"], min(epochs, state["epoch"] + (stop_after or epochs))):
        started, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        sampler.set_epoch(epoch)  # the shuffle of epoch e: the same permutation on every rank
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derived_seed("distill", seed, epoch, rank))  # e.g. dropout
            for images, _ in tqdm(loader, desc=f"distill {epoch + 1}/{epochs}", unit="batch",
                                  disable=not progress or rank != 0):
                images = to_unit_images(images, device, memory_format)
                loss_sum += kd_step(teacher, model, optimizer, images, temperature, amp)
                schedule.step()
        student.eval()  # finite weights can be so large that every output overflows
        with torch.no_grad(), amp:
            tensors = [student(images), *student.state_dict().values()]
        student.train()
        finite = all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
        # summed over the ranks (each runs len(loader) batches): the loss, the failing students
        totals = torch.tensor([loss_sum.item(), not finite], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        if not math.isfinite(totals[0]) or totals[1] > 0:
            raise RunFailure(f"distillation diverged in epoch {epoch + 1} (KD loss {totals[0]:.4g}"
                             f" or non-finite weights): lower --lr (now {lr}) and add --overwrite")
        state["history"].append(totals[0].item() / (world * len(loader)))
        state["epoch_seconds"].append(time.perf_counter() - started)
        state["epoch"] = epoch + 1
        if on_epoch is not None:
            on_epoch({**state, "student": student.state_dict(),
                      "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    return state["history"]


# ── Stage 5. Precision and recall of the synthetic set (§5), accuracy on real test sets ───────────
def precision_recall(real_features, fake_features, k=3, batch_size=1024):
    """Precision and recall (Kynkäänniemi et al. 2019) of the M fake rows y against the N real
    rows x (§5), with k-NN balls B(x, r_k(x)) drawn in each point's own set; strict "<" as in
    the authors' code. Blocks of `batch_size` fakes: no full distance matrix is held."""
    # r_k(x): the (k + 1)-th smallest distance from x within its own set, x itself being the 1st
    real_radii, fake_radii = (
        torch.cat([torch.cdist(x[i:i + batch_size], x).kthvalue(k + 1, 1).values
                   for i in range(0, len(x), batch_size)]) for x in (real_features, fake_features))
    inside_real = 0
    real_in_fake = torch.zeros(len(real_features), dtype=torch.bool, device=real_features.device)
    for start in range(0, len(fake_features), batch_size):
        distances = torch.cdist(fake_features[start:start + batch_size], real_features)  # (M', N)
        # precision = 1/M · Σ_j 1[∃ i: ‖y_j − x_i‖ < r_k(x_i)]: fakes inside the real manifold
        inside_real += (distances < real_radii).any(dim=1).sum().item()
        # recall = 1/N · Σ_i 1[∃ j: ‖x_i − y_j‖ < r_k(y_j)]: reals inside the fake manifold
        real_in_fake |= (distances < fake_radii[start:start + batch_size, None]).any(dim=0)
    return {"precision": inside_real / len(fake_features),
            "recall": real_in_fake.sum().item() / len(real_features)}


def eval_transform(image_size, resize_size=None):
    """Evaluation: shorter side to `resize_size` (image_size/0.875), centre crop, [0, 1] tensor."""
    return transforms.Compose([transforms.Resize(resize_size or round(image_size / 0.875)),
                               transforms.CenterCrop(image_size), transforms.ToTensor()])


@torch.no_grad()
def extract_features(teacher, data_dir, *, classes=None, image_size=224, resize_size=None,
                     batch_size=100, device="cpu", num_workers=0, progress=True):
    """(features, labels) of an image folder under eval_transform (§5): the input of the
    teacher's last nn.Linear (its logits if it has none, e.g. SqueezeNet)."""
    dataset = image_folder(data_dir, eval_transform(image_size, resize_size), classes)
    head, captured = last_linear_module(teacher.to(device).eval()), []
    hook = (head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
            if isinstance(head, nn.Linear) else contextlib.nullcontext())
    features, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    with hook:  # removed on the way out
        for images, targets in tqdm(loader, desc=f"features of {Path(data_dir).name}",
                                    unit="batch", disable=not progress):
            logits = teacher(images.to(device))
            features.append((captured[-1] if captured else logits).flatten(1).float().cpu())
            captured.clear()  # a head that runs twice in a forward: its last input
            labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def evaluate(model, data_dir, *, classes=None, batch_size=100, device="cpu", image_size=224,
             resize_size=None, num_workers=0, progress=True):
    """Top-1 and top-5 accuracy (%) on an image folder under eval_transform (§5), `classes` the
    class of each sorted folder (default 0, 1, ...), scored over those classes' logits only (the
    ImageNet-R/-A protocol). Under torchrun each rank scores a share; every rank gets the sums."""
    rank, world = rank_and_world()
    dataset = image_folder(data_dir, eval_transform(image_size, resize_size), classes)
    subset = torch.tensor(sorted(range(len(dataset.classes)) if classes is None else classes))
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(share, batch_size, num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model.to(device).eval()
    top1 = top5 = 0
    for images, labels in tqdm(loader, desc="evaluate", unit="batch",
                               disable=not progress or rank != 0):
        logits = model(images.to(device))[:, subset.to(device)]
        # restricted logits: the k best are S[topk_j f(x)_{S_j}] over the set's classes S
        best = subset[logits.topk(min(5, len(subset)), dim=-1).indices.cpu()]
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels.view(-1, 1)).any(dim=1).sum().item()
    top1, top5 = [sum(counts) for counts in zip(*gather_from_ranks([top1, top5]))]  # all ranks
    return {"top1": 100.0 * top1 / len(dataset), "top5": 100.0 * top5 / len(dataset),
            "images": len(dataset)}


# ── main(): the stages in sequence ────────────────────────────────────────────────────────────────
def main(argv=None):
    """PRISM on the command line: the stages in sequence, each reused from --out once done (rerun
    to resume). Exit code: 0; 2: bad input or damaged --out; 1: a failed run; 130: interrupted."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with errors_reported(argv) as status:  # Part II: any error → one line and an exit code
        args = parse_args(argv)  # every flag checked
        device = init_distributed(args.device)  # joins torchrun's processes, when there are some
        with exclusive_out(args.out):  # one run at a time per --out
            if args.benchmark or args.check_guidance:  # tools (Part III): they measure, not distil
                run_tool(args, device)
                return 0
            out, models = load_models(args, device)  # f_T, f_S, classes; the LLM found or cached
            test_sets = [] if args.prompts_only else labelled_test_sets(args, models)
            # the sampler and its flags checked before anything is recorded (not needed for prompts)
            pipe = None if args.prompts_only else load_sampler(args, device, out)

            # Stage 1 (§3): prompts, made once (rank 0, with the LLM), kept in prompts.json.
            prompts, sources = prompts_stage(args, out, models, device)
            if args.prompts_only:  # prompts_stage said where they are, to read
                return 0

            # Stages 2-3 (§1-2): energy-guided synthesis of the set, cached in OUT/synthetic.
            data = synthesis_stage(args, out, models, prompts, pipe)
            del pipe  # the diffusion model leaves the GPU before training
            if data is None:
                return 0

            # Stage 4 (§4): distillation, resumed from OUT/checkpoint.pt.
            results = {"ablate": args.ablate, "scheduler": data["scheduler"], "prompts": sources}
            if not distillation_stage(args, out, models, data, results, device):
                return 0

            # Stage 5 (§5): the set against real images; teacher and student on each test set.
            measurement_stage(args, out, models, test_sets, results, device)
    return status.code


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART II — PLUMBING. Nothing below changes what is computed: errors, files, resume, labelled
# folders, several processes, model loading and the command line.
# ══════════════════════════════════════════════════════════════════════════════════════════
import argparse
import collections
import dataclasses
import fcntl
import inspect
import io
import traceback
import types
from datetime import timedelta

import torch.distributed as dist


# ── The teacher: its own preprocessing folded in, so every stage hands it [0, 1] images ───────────
class Preprocess(nn.Module):
    """[0, 1] images of any size → a classifier's input: differentiable resize (§2), normalised."""

    def __init__(self, input_size, mean, std, resize_size=None):
        super().__init__()
        self.input_size, self.resize_size = input_size, resize_size or round(input_size / 0.875)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images):
        images, size = images.to(self.mean.dtype), (self.input_size, self.input_size)  # fp16 → 32
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return (images - self.mean) / self.std


def with_preprocessing(model, input_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       resize_size=None):
    """nn.Sequential(Preprocess, model): a classifier that takes [0, 1] images of any size."""
    return nn.Sequential(Preprocess(input_size, mean, std, resize_size), model)


# The command line, CleanRL style: a dataclass holds every flag (--field-name), its type, default,
# help and range (checked once parsed); a method's default is read from its Part I function.
def keyword_defaults(function):
    """{name: default} of `function`'s keywords: a method's values, written once, in Part I."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def flag(default, text, check=(lambda value: True, ""), **options):
    """A field of Args: default, help, `check` = (test, words), argparse options or a group."""
    return dataclasses.field(default=default, metadata={"help": text, "check": check, **options})


SAMPLER, PROMPTING = keyword_defaults(energy_guided_sample), keyword_defaults(build_prompts)
CACHING, KD = keyword_defaults(synthesize_dataset), keyword_defaults(distill)
POSITIVE, NAME = (lambda v: 0 < v < math.inf, "positive"), (str.strip, "a name, not blank")
AT_LEAST_0 = (lambda v: 0 <= v < math.inf, "at least 0")  # each range is finite: no inf, no nan
SHARE = (lambda v: 0 <= v <= 1, "in [0, 1]")
COUNT = (lambda v: 1 <= v <= 100_000, "from 1 to 100,000")  # a typo's extra zeros: refused
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
CLASSIFIER = (lambda v: v in torchvision.models.list_models(module=torchvision.models),
              "a torchvision classifier name, e.g. resnet50")


@dataclasses.dataclass(frozen=True)
class Args:
    """Every flag of prism.py (the README tells more)."""
    smoke: bool = flag(False, "offline check: tiny random models, a CPU", group="modes, reruns")
    benchmark: bool = flag(False, "time sampling and KD on random weights: OUT/benchmark.md")
    check_guidance: bool = flag(False, "measure guidance on these weights: OUT/check_guidance.md")
    check_classes: int = flag(4, "classes for --check-guidance", POSITIVE)
    check_seeds: int = flag(2, "images per class for --check-guidance", COUNT)
    overwrite: bool = flag(False, "replace what --out holds from other settings, or damaged")
    debug: bool = flag(False, "print the traceback of an error")
    out: str = flag("runs/prism", "output folder", NAME, group="run")
    seed: int = flag(0, "seed of prompts, images, KD", (lambda v: 0 <= v < 2**63, "in [0, 2^63)"))
    device: str = flag("auto", "auto, cpu, cuda, cuda:1, ... (torchrun: cuda:LOCAL_RANK or cpu)")
    workers: int = flag(None, "data loaders per process (default: its cores - 1, at most 12)",
                        (lambda v: 0 <= v <= CORES, "from 0 to the usable cores"))
    teacher: str = flag("resnet50", "torchvision classifier", CLASSIFIER, group="models, classes")
    teacher_weights: str = flag(None, "the teacher's state dict, instead of torchvision's")
    data: str = flag("imagenet", "'imagenet' or a file of 'name[<TAB>description]' lines")
    student: str = flag("resnet18", "torchvision classifier, trained from scratch", CLASSIFIER)
    sd_model: str = flag("stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.x/2.x", NAME)
    llm: str = flag("Qwen/Qwen2.5-1.5B-Instruct", "instruction-tuned LM; none: no LLM", NAME)
    per_class: int = flag(100, "images (and prompts) per class", COUNT, group="prompts (§3)")
    photo_share: float = flag(PROMPTING["photo_share"], "share of photo styles", SHARE)
    neighbours: int = flag(PROMPTING["neighbours"], "teacher-nearest classes (0: off)", AT_LEAST_0)
    scenes_per_class: int = flag(PROMPTING["scenes_per_class"], "scenes the LLM writes a class",
                                 (lambda v: 1 <= v <= 24, "from 1 to 24"))
    prompts_only: bool = flag(False, "write OUT/prompts.json to read, then stop")
    steps: int = flag(SAMPLER["num_steps"], "T, denoising steps", POSITIVE, group="sampling (§1-2)")
    cfg: float = flag(SAMPLER["cfg_scale"], "w, classifier-free guidance (<= 1: off)", AT_LEAST_0)
    energy_scale: float = flag(SAMPLER["energy_scale"], "s_E, weight of the energy", AT_LEAST_0)
    class_scale: float = flag(SAMPLER["class_scale"], "s_C, weight of the CE", AT_LEAST_0)
    energy_temperature: float = flag(SAMPLER["temperature"], "τ of the energy", POSITIVE)
    guidance_start: float = flag(SAMPLER["guidance_start"], "guided window's start", SHARE)
    guidance_end: float = flag(SAMPLER["guidance_end"], "guided window's end", SHARE)
    guidance_every: int = flag(SAMPLER["guidance_every"], "guide every k-th step", POSITIVE)
    scheduler: str = flag("DDIMScheduler", "diffusers scheduler, or 'model' (SD 1.5's: PNDM)")
    exact_grad: bool = flag(False, "differentiate through the UNet (slower)")
    no_grad_norm: bool = flag(False, "do not rescale g to (s_E+s_C)·‖ε̂‖")
    guidance_batch: int = flag(SAMPLER["guidance_batch"], "images per guidance decode", POSITIVE)
    gen_batch: int = flag(CACHING["batch_size"], "images per sampling batch", POSITIVE)
    height: int = flag(None, "image height (default: the model's)", POSITIVE)
    width: int = flag(None, "image width (default: the model's)", POSITIVE)
    image_format: str = flag(CACHING["image_format"], "cached format", choices=("png", "jpg"))
    max_new_images: int = flag(None, "make at most this many images now", POSITIVE)
    store_size: int = flag(320, "cached images' shorter side (0: as made)", AT_LEAST_0)
    dtype: str = flag("auto", "SD's precision (auto: float16 on CUDA)", group="speed (same images)",
                      choices=("auto", "float16", "bfloat16", "float32"))
    channels_last: bool = flag(None, "default: on with CUDA", action=argparse.BooleanOptionalAction)
    epochs: int = flag(100, "KD epochs (0: no distillation)", AT_LEAST_0, group="distillation (§4)")
    epochs_this_run: int = flag(None, "train at most this many epochs now", POSITIVE)
    batch_size: int = flag(256, "global KD batch size", POSITIVE)
    lr: float = flag(0.1, "peak SGD learning rate (cosine decay)", POSITIVE)
    weight_decay: float = flag(KD["weight_decay"], "SGD weight decay", AT_LEAST_0)
    kd_temperature: float = flag(KD["temperature"], "τ_kd", POSITIVE)
    crop_scale: float = flag(KD["crop_scale"], "smallest crop", (lambda v: 0 < v <= 1, "in (0, 1]"))
    image_size: int = flag(KD["image_size"], "student input size", POSITIVE)
    pr_k: int = flag(keyword_defaults(precision_recall)["k"], "k of precision and recall", POSITIVE,
                     group="measuring (§5), evaluation, ablations")
    val_dir: str = flag(None, "real images, a folder per class; repeat it (first: ImageNet val)",
                        action="append", metavar="[NAME=]PATH")
    class_ids: str = flag(None, "the classes' ids in label order, one a line", metavar="FILE")
    ablate: str = flag(None, "turn parts of the method off", nargs="+", action="extend",
                       choices=("guidance", "disambiguation", "content", "style"))


ARGS = Args()  # the defaults


# ── The LLM: asking it (cached), each line of an answer one short phrase ──────────────────────────
def answer_phrases(answer, entry, max_words=14):
    """The phrases of an LLM's answer about `entry`'s class, a line each: its first sentence in
    `max_words` words (CLIP reads 77 tokens), bare; no bare name, no teacher neighbour."""
    phrases, name = [], entry["name"].lower()
    for line in answer.splitlines():
        line = "".join(filter(str.isprintable, line)).strip()
        title = line.startswith("#")  # a markdown title ("### Outdoors")
        line = re.sub(r"^\W*(?:\d+[.)])?\s*", "", line)  # a list marker
        # the text after a heading ("**Desk**: ...", "**Desk** – ...")
        line = re.split(r":(?:\*\*|__)? |(?:\*\*|__) ?[-–—] ", line, maxsplit=1)[-1]
        line = re.sub(r"^(?:[^.!?]*\w[!?] +)+|[*_`\"“”]", "", line).strip(" '.,;")  # "Sure! "
        # a phrase has a word, no ':?!' at its end ("Here are 12 scenes:"), no "A mouse is"
        if not title and re.search(r"(?<!\S)[A-Za-z]{2,}(?!\S)", line) and line[-1] not in ":?!":
            sentence = re.split(r"(?<=\w{3})\. ", line)[0]  # not after "e.g." or "St."
            sentence = re.sub(r"^(?:\S+ ){0,3}?(?:is|are) (?=(?:an?|the) )", "", sentence)
            # cut at max_words, never left ending on an article, preposition or conjunction
            phrases.append(re.sub(r"(?: (?:an?|the|of|to|in|on|at|with|by|for|from|and|or))+$",
                                  "", " ".join(sentence.split()[:max_words])))
    return [p for p in dict.fromkeys(phrases) if re.sub(r"^(?:an?|the) ", "", p.lower()) != name
            and not names_any(p, entry["neighbours"], name)]


def ask_llm(llm, questions, answers, *, max_new_tokens, device="cpu", batch_size=16):
    """(answers, llm): cached in `answers`, else greedy by `llm` (a name: loaded), chat or not."""
    missing = [question for question in dict.fromkeys(questions) if question not in answers]
    if missing:
        model, tokenizer = llm = llm if isinstance(llm, tuple) else load_llm(llm, device)
        chat = getattr(tokenizer, "chat_template", None) is not None
        for start in tqdm(range(0, len(missing), batch_size), desc="llm", unit="batch"):
            batch = missing[start:start + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   tokenize=False, add_generation_prompt=True)
                     if chat else text + "\n" for text in batch]
            tokens = tokenizer(texts, return_tensors="pt", padding=True,
                               add_special_tokens=not chat).to(model.device)
            with torch.no_grad():
                output = model.generate(**tokens, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            answers.update(zip(batch, tokenizer.batch_decode(
                output[:, tokens["input_ids"].shape[1]:], skip_special_tokens=True)))
    return [answers[question] for question in questions], llm


# ── Errors: bad input is one line and exit code 2, a failed run one line and exit code 1 ──────────
class UsageError(ValueError):
    """Bad input or damaged state in --out: one line on stderr, exit code 2."""


class RunFailure(RuntimeError):
    """A run that cannot go on (training diverged): one line on stderr, exit code 1."""


def first_line(error):
    """The first line of an exception's message (else its type's name)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def damaged(path, error, way_out):
    """The UsageError for a damaged file: which, why (a first sentence, cut short), the way out."""
    return UsageError(f"{path} is damaged ({first_line(error).split('. ')[0][:120]}); {way_out}")


def report(kind, message):
    """`prism: <kind> (rank r): <message>` on stderr in one write; r from torchrun's variables."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sys.stderr.write(f"prism: {kind}{f' (rank {rank})' if world > 1 else ''}: {message}\n")


# ── Files: atomic writes, strict JSON, readable images ────────────────────────────────────────────
def atomic_write(path, write):
    """write(temp), synced, renamed onto `path`: a kill or full disk leaves the old file or new."""
    path = Path(path)
    # one run per --out (its lock): the next run overwrites a killed one's temp file
    temp = path.with_name(f".{path.name}.tmp{os.environ.get('RANK', '0')}")
    try:
        write(temp)
        with open(temp, "rb") as file:  # else a machine that goes down may keep an empty file
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {first_line(error)}; fix it and rerun: no loss")


def save_torch_atomic(obj, path):
    """torch.save to `path` atomically, serialised in memory first: a full disk is an OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda temp: temp.write_bytes(buffer.getbuffer()))


def strict_json(obj, **options):
    """`obj` as strict JSON text: every NaN or ±inf becomes null (JSON has no such numbers)."""
    plain = json.loads(json.dumps(obj), parse_constant=lambda _: None)
    return json.dumps(plain, allow_nan=False, **options)


def write_json_atomic(obj, path):
    """Writes `obj` as indented, strict JSON to `path` atomically."""
    text = strict_json(obj, indent=1) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def read_json(path, way_out):
    """The JSON object at `path`; not UTF-8, not JSON or not an object: damaged (and `way_out`)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(path, error, way_out)
    if not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__}, not an object", way_out)
    return data


def save_image_atomic(image, path, note=""):
    """Saves a [0, 1] (3, H, W) image atomically: 8-bit PNG or JPEG by suffix, `note` in EXIF."""
    if not torch.isfinite(image).all():
        raise ValueError(f"refusing to save non-finite pixels as {path}")
    pixels = image.detach().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    image, exif = Image.fromarray(pixels.cpu().numpy()), Image.Exif()
    exif[0x010E] = note  # ImageDescription
    kind = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    atomic_write(path, lambda temp: image.save(temp, format=kind, quality=95, exif=exif))


# ── Resume: settings, the images, checkpoints (nothing cached is lost or mixed) ───────────────────
def settings_difference(old, new, shown=3):
    """The first `shown` keys whose values differ between two settings dicts, as short text."""
    keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    text = ", ".join(f"{k}: {str(old.get(k))[:40]} -> {str(new.get(k))[:40]}" for k in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_settings(path, settings, *, overwrite, what):
    """True if `settings` are those at `path`; False if none, or other or damaged with overwrite."""
    path, settings = Path(path), json.loads(json.dumps(settings))  # as stored: tuples are lists
    if not path.exists():
        return False
    way_out = f"rerun with --overwrite to remake the {what}"
    stored = read_ours(path, {"settings": dict}, way_out, overwrite=overwrite)  # None: damaged
    same = stored is not None and stored["settings"] == settings
    if same or overwrite:
        return same
    raise UsageError(f"{path.parent} holds {what} made under other settings "
                     f"({settings_difference(stored['settings'], settings)}); use another "
                     f"--out, or --overwrite to replace them")


# ── Labelled image folders: which folder is which class ───────────────────────────────────────────
def image_folder(data_dir, transform, classes=None):
    """ImageFolder of `data_dir`; the i-th sorted folder is class classes[i] (default: i)."""
    return torchvision.datasets.ImageFolder(  # a damaged image: one line that names it
        str(data_dir), transform=transform, loader=read_image,
        target_transform=None if classes is None else list(classes).__getitem__)


def named_val_sets(values):
    """(name, path) of each --val-dir value, `NAME=PATH` or `PATH` (named by its folder)."""
    sets = {}
    for value in values or []:
        named = re.fullmatch(r"([^=/]*)=(.*)", value)  # a "/" before "=": the path holds the "="
        name, path = named.groups() if named else (Path(os.path.abspath(value)).name, value)
        if not (name.strip() and path.strip()) or name in sets:
            raise UsageError(f"--val-dir {value}: give each set a folder and a name of its own "
                             f"(NAME=PATH)")
        sets[name] = Path(path)
    return list(sets.items())


def read_lines(path, flag, count=None):
    """A UTF-8 file's non-blank lines split at the first tab; a name blank or twice: UsageError."""
    try:
        rows = [[cell.strip() for cell in line.split("\t", 1)]
                for line in Path(path).read_bytes().decode("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path} cannot be read ({first_line(error)}): give a UTF-8 file")
    keys = [row[0].lower() for row in rows]
    twice = [key for key, n in collections.Counter(keys).items() if n > 1]
    problem = ("is empty" if not rows else "has a line with no name before its tab" if "" in keys
               else f"gives '{twice[0]}' twice" if twice
               else f"has {len(rows)} lines but the teacher has {count} classes"
               if count not in (None, len(rows)) else None)
    if problem:
        raise UsageError(f"{flag} {path} {problem}: give one class a line, in label order")
    return rows


def class_mapping(folders, num_classes, class_names, class_ids=None):
    """(classes, rule): each folder's class by the first rule mapping all (V2: integers; R: ids)."""
    by_name, ids = collections.defaultdict(list), {id_: n for n, id_ in enumerate(class_ids or [])}
    for index, name in enumerate(class_names):
        by_name[name.lower()].append(index)
    wnids = not ids and len(folders) == num_classes and all(
        re.fullmatch(r"[a-z][0-9]{8}", f) for f in folders)
    rules = {"integer folder names": {f: int(f) for f in folders if re.fullmatch(r"[0-9]+", f)},
             "class names": {f: by_name[f.lower()][0] for f in folders if f.lower() in by_name},
             "--class-ids": {f: ids[f] for f in folders if f in ids},
             "sorted folder names": {f: n for n, f in enumerate(sorted(folders)) if wnids}}
    rule = next((rule for rule, found in rules.items() if len(found) == len(folders)), None)
    if rule is None:
        lost = next((f for f in folders if not any(f in found for found in rules.values())),
                    folders[0])
        raise UsageError(f"folder '{lost}' maps to no class; give --class-ids FILE (ids in label "
                         f"order: ImageNet-R, -A), or name the folders by class index")
    classes = [rules[rule][f] for f in folders]
    for n, (folder, c) in enumerate(zip(folders, classes)):
        if rule == "class names" and len(by_name[folder.lower()]) > 1:
            raise UsageError(f"folder '{folder}' names classes {by_name[folder.lower()]} of the "
                             f"class list: name the folders by class index")
        if c >= num_classes:
            raise UsageError(f"folder '{folder}' is class {c}, but the teacher's classes are "
                             f"0 to {num_classes - 1}")
        if c in classes[:n]:
            raise UsageError(f"folders '{folders[classes.index(c)]}' and '{folder}' are both "
                             f"class {c}")
    return classes, rule


def labelled_sets(named_sets, class_names, class_ids=None):
    """Each (name, path) as a dict (folders, classes, image count); every image decoded now."""
    sets, (rank, world) = [], rank_and_world()
    for name, path in named_sets:
        try:  # ImageFolder's folders, mapped before it looks for images
            folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
            classes, rule = class_mapping(folders, len(class_names), class_names, class_ids)
            files = [file for file, _ in image_folder(path, None).samples]
        except (UsageError, OSError) as error:
            raise UsageError(f"--val-dir {name} ({path}): {first_line(error)}")
        problem = ""
        for file in tqdm(files[rank::world], desc=f"checking --val-dir {name}", unit="img",
                         disable=rank != 0 or len(files) < 1000):
            try:
                with Image.open(file) as image:
                    image.load()
            except Exception as error:  # whatever PIL says, the file is not a usable image
                problem = (f"--val-dir {name}: {file} is not a readable image "
                           f"({first_line(error)}); fix or remove it")
                break
        problem = next((p for [p] in gather_from_ranks([problem]) if p), "")  # all ranks learn it
        if problem:
            raise UsageError(problem)
        sets.append({"name": name, "data": str(path), "folders": folders, "classes": classes,
                     "mapping": rule, "images": len(files)})
    return sets


# ── Several processes (torchrun) and devices ──────────────────────────────────────────────────────
# `torchrun --nproc_per_node=N prism.py ...` starts N copies of this program; init_distributed
# joins them into one process group. Without one these helpers are those of rank 0 of 1.
def rank_and_world():
    """(rank, world size) of this process in the torch.distributed group, or (0, 1) without one."""
    joined = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if joined else (0, 1)


def barrier():
    """Waits for every rank, however long, counted at the group's store (a collective times out)."""
    world = rank_and_world()[1]
    if world > 1:
        store = dist.distributed_c10d._get_default_store()
        # a counter per torchrun restart (the agent's store outlives one): barrier n ends at n·world
        key = f"prism/barrier/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        passed = math.ceil(store.add(key, 1) / world) * world
        while store.add(key, 0) < passed:
            time.sleep(0.1)


def gather_from_ranks(items):
    """[items of rank 0, items of rank 1, ...] (Python lists) on every rank, after a barrier()."""
    parts = [list(items)] * rank_and_world()[1]
    if len(parts) > 1:
        barrier()
        dist.all_gather_object(parts, list(items))
    return parts


def on_rank_zero(work):
    """Runs work() on rank 0, the others waiting; its error is raised on every rank: none hangs."""
    error = None
    if rank_and_world()[0] == 0:
        try:
            work()
        except Exception as caught:  # raised below, on every rank
            error = caught
    shared = gather_from_ranks([error and [isinstance(error, UsageError), str(error)]])[0][0]
    if shared is not None:
        raise error or (UsageError if shared[0] else RunFailure)(shared[1])


def process_gpu(local_rank, visible_gpus):
    """The GPU of process LOCAL_RANK `local_rank`: its own of `visible_gpus`, or the one it sees."""
    if visible_gpus != 1 and local_rank >= visible_gpus:
        raise UsageError(f"process {local_rank} of this node has no GPU of its own ({visible_gpus} "
                         f"visible): use --nproc_per_node <= the GPU count")
    return 0 if visible_gpus == 1 else local_rank


def init_distributed(device_name, timeout=timedelta(minutes=30)):
    """This process's torch device for --device ("auto": CUDA if any), in torchrun's group."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError as error:
        raise UsageError(f"bad --device '{device_name}': {first_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device_name}: no CUDA GPU is available here")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", process_gpu(int(os.environ.get("LOCAL_RANK", "0")),
                                                      torch.cuda.device_count()))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return device


@contextlib.contextmanager
def rank_zero_first():
    """Runs the body on rank 0, then on the other ranks: a model download fills the cache once."""
    if rank_and_world()[0] != 0:
        barrier()
    yield
    if rank_and_world()[0] == 0:
        barrier()


@contextlib.contextmanager
def exclusive_out(out):
    """One run at a time per --out: rank 0 flocks OUT/.prism.lock, which dies with it (SIGKILL)."""
    with contextlib.ExitStack() as held:
        def lock():
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
                handle = held.enter_context(open(Path(out) / ".prism.lock", "a"))
                # a forked loader worker outlives a killed run by seconds: it must not keep it
                os.register_at_fork(after_in_child=handle.close)
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"{out} is in use by another prism run: wait, or use other --out")
            except OSError as error:
                raise UsageError(f"cannot use --out {out}: {first_line(error)}")
        on_rank_zero(lock)
        yield


# ── Model loading: a hub id or a local folder, or one line that says what to do ───────────────────
def locate_model(name, flag, alternative=""):
    """(source, local_files_only): a folder; a hub id the hub knows (asked 10 s), else the cache."""
    import huggingface_hub as hub
    name, tail = str(name), f"; or use {alternative}" if alternative else ""
    offline = hub.constants.HF_HUB_OFFLINE
    if Path(name).is_dir():
        return name, True
    try:
        hub.utils.validate_repo_id(name)  # a path that is no folder fails here
        if not offline:
            hub.model_info(name, timeout=10)
            return name, False
    except (hub.errors.RepositoryNotFoundError, hub.errors.HFValidationError):
        raise UsageError(f"{flag} {name}: no such model on the hub and no such folder{tail}")
    except Exception:  # the hub cannot be reached: the cache may still hold the model
        pass
    try:
        return hub.snapshot_download(name, local_files_only=True), True  # the cached folder
    except Exception:
        raise UsageError(f"{flag} {name}: not in the local cache and the hub is "
                         f"{'off (HF_HUB_OFFLINE)' if offline else 'unreachable'}; download "
                         f"it (`hf download {name}`) and pass its folder{tail}")


def load_pretrained(name_or_path, flag, what, load, alternative=""):
    """load(source, local_files_only) of what locate_model finds; a failure is a UsageError too."""
    source, local_only = locate_model(name_or_path, flag, alternative)
    try:
        return load(source, local_only)
    except Exception as error:  # any failure here means "cannot use this model"
        raise UsageError(f"cannot load {what} {name_or_path} ({type(error).__name__}: "
                         f"{first_line(error)[:120]}); check that the folder is complete"
                         + (f", or use {alternative}" if alternative else ""))


def load_teacher(name, device, *, weights_path=None, num_classes=1000):
    """(f_T, class names or None): torchvision's `name` frozen, preprocessed as its weights say."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:  # torchvision refuses DEFAULT weights for other classes than theirs
        model = torchvision.models.get_model(name, weights=None if weights_path else weights,
                                             num_classes=num_classes)
        if weights_path:
            model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    except Exception as error:  # a download or a state dict that fails: say which, and what to do
        raise UsageError(f"cannot load the {name} teacher's weights {weights_path or weights} "
                         f"({first_line(error)[:120]}); offline, put them in "
                         f"{torch.hub.get_dir()}/checkpoints or pass --teacher-weights PATH")
    preset = weights.transforms()
    teacher = with_preprocessing(model, preset.crop_size[0], preset.mean, preset.std,
                                 preset.resize_size[0])
    names = None if weights_path else list(weights.meta["categories"])
    return teacher.to(device).eval().requires_grad_(False), names


def load_class_names(data):
    """(class_names, descriptions or None) of --data: ImageNet's (torchvision's), or a file's."""
    if data == "imagenet":
        return list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]), None
    rows = read_lines(data, "--data")
    descriptions = [row[1] if len(row) > 1 else "" for row in rows]
    return [row[0] for row in rows], descriptions if any(descriptions) else None


def load_llm(name_or_path, device):
    """(model, tokenizer) of a causal LM, padded on the left: each row generates on from its end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = "auto" if torch.device(device).type == "cuda" else torch.float32
    tokenizer, model = load_pretrained(name_or_path, "--llm", "LLM", lambda source, local: (
        AutoTokenizer.from_pretrained(source, local_files_only=local, padding_side="left"),
        AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=dtype)),
        "--llm none")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_diffusion_pipeline(name_or_path, device, dtype=torch.float32):
    """A frozen StableDiffusionPipeline, no safety checker: its blacked-out images would be data."""
    from diffusers import StableDiffusionPipeline
    # low_cpu_mem_usage=False: diffusers' choice without `accelerate` (measured: as fast), said
    pipe = load_pretrained(name_or_path, "--sd-model", "diffusion model", lambda source, local:
                           StableDiffusionPipeline.from_pretrained(
                               source, dtype=dtype, safety_checker=None, local_files_only=local,
                               requires_safety_checker=False, low_cpu_mem_usage=False))
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ── The command line: every flag checked, alone and together ──────────────────────────────────────
def parse_args(argv):
    """The flags of `argv` (Args: --field-name), each checked, then together. --smoke (--benchmark
    on a CPU) shrinks the defaults; the machine sets --workers, --channels-last and --dtype's."""
    def refuse(message):  # argparse's errors: one line naming the flag, exit code 2
        raise UsageError(message.removeprefix("argument "))

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.error = refuse
    for field in dataclasses.fields(Args):
        options = {key: value for key, value in field.metadata.items() if key != "check"}
        if "group" in options:
            group = parser.add_argument_group(options.pop("group"))
        if field.default is not None and field.default is not False:  # --help shows a real one
            options["help"] += " (default: %(default)s)"
        kind = {"action": "store_true"} if field.type is bool else {"type": field.type}
        group.add_argument("--" + field.name.replace("_", "-"), default=field.default,
                           **{**kind, **options})
    known = parser.parse_known_args(argv)[0]
    cuda = known.device.startswith("cuda") or known.device == "auto" and torch.cuda.is_available()
    # loaders: this process's share of the cores, less one; ≤ 12: each decodes ~500 cached 320²
    # PNGs/s (measured), so 12 outrun resnet50 → 18 KD on a GPU
    cores = CORES // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    parser.set_defaults(workers=min(12, max(0, cores - 1)), channels_last=cuda)
    if known.smoke:
        parser.set_defaults(per_class=4, steps=10, height=32, width=32, gen_batch=8, epochs=2,
                            batch_size=8, image_size=32, workers=0, lr=0.05, guidance_start=0.0,
                            guidance_end=1.0, guidance_every=1)
    if known.benchmark and not cuda:
        parser.set_defaults(height=128, width=128, steps=10, gen_batch=1, batch_size=8,
                            workers=min(2, CORES))
    args = parser.parse_args(argv)
    for field in dataclasses.fields(Args):  # each value in its range
        (test, words), value = field.metadata["check"], getattr(args, field.name)
        if value is not None and not test(value):
            raise UsageError(f"--{field.name.replace('_', '-')}: must be {words}, got {value!r}")
    args.ablate = list(dict.fromkeys(args.ablate or []))  # --ablate a --ablate b: both, once
    args.dtype = ("float16" if cuda else "float32") if args.dtype == "auto" else args.dtype
    named_val_sets(args.val_dir)
    if args.benchmark and args.check_guidance:
        raise UsageError("--benchmark and --check-guidance are two runs: give one of them")
    if (args.benchmark or args.check_guidance) and ("guidance" in args.ablate or not (
            args.energy_scale or args.class_scale)):
        raise UsageError("--benchmark and --check-guidance measure guidance: drop --ablate "
                         "guidance, give --energy-scale or --class-scale above 0")
    if args.guidance_start >= args.guidance_end:
        raise UsageError(f"--guidance-start {args.guidance_start}: must be below --guidance-end")
    if args.cfg <= 1 and os.environ.get("RANK", "0") == "0":
        report("warning", f"--cfg {args.cfg} <= 1 turns classifier-free guidance off")
    return args


def check_sampler(pipe, options):
    """Refuses energy_guided_sample's `options` that cannot mean what they say with this model."""
    options, scheduler, name = {**SAMPLER, **options}, pipe.scheduler, type(pipe.scheduler).__name__
    steps, trained = options["num_steps"], scheduler.config.num_train_timesteps
    if steps > trained:
        raise UsageError(f"--steps {steps} is more than the {trained} the model was trained with")
    factor, size = pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = options["height"] or size, options["width"] or size
    if height % factor or width % factor:
        raise UsageError(f"--height and --width must be multiples of {factor}: {height}, {width}")
    if not (options["energy_scale"] or options["class_scale"]):
        return
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(f"--sd-model: energy guidance needs an epsilon or v_prediction model, not "
                         f"'{scheduler.config.prediction_type}'")
    if name.startswith("KDPM2"):  # an oracle's z_t drifts from alpha_bar_at's ᾱ by 30 (others 4e-5)
        raise UsageError(f"energy guidance cannot use {name}: use e.g. DDIM, Euler or DPM++")
    scheduler.set_timesteps(steps)
    start, end, every = (options[k] for k in ("guidance_start", "guidance_end", "guidance_every"))
    count = len(scheduler.timesteps)  # PNDM makes one more than asked
    guided = guided_step_indices(count, start, end, every)
    if not guided:
        raise UsageError(f"the guidance window [{start}, {end}) every {every} holds none of the "
                         f"{count} sampling steps: widen it, or --ablate guidance")
    # A multistep scheduler mixes past steps' ε̂: along g, SD 1.5's PNDM guided every 2nd step
    # moves the latent +15, -3, +26, +2, +31 where DDIM moves +7, +7, +13, +13.
    multistep = getattr(scheduler, "order", 1) > 1 or any(hasattr(scheduler, state) for state in (
        "ets", "derivatives", "model_outputs", "sample", "prev_derivative"))  # past steps kept
    if multistep and len(guided) < count:
        raise UsageError(f"{name} is a multistep scheduler: use --scheduler DDIMScheduler, or "
                         f"guide all steps: --guidance-start 0 --guidance-end 1 --guidance-every 1")


# ── Before any work: models loaded, inputs checked, what --out holds read; the frame of main() ────
def fits(value, shape):
    """True if the JSON `value` has `shape`: a type; {key: shape, ...}, an object with at least
    these keys ({str: shape}: any keys); [shape, least, most], a list of such (sizes optional)."""
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(
            all(fits(v, item) for v in value.values()) if key is str
            else key in value and fits(value[key], item) for key, item in shape.items())
    if isinstance(shape, list):
        item, least, most = shape + [0, math.inf][len(shape) - 1:]
        return (isinstance(value, list) and least <= len(value) <= most
                and all(fits(v, item) for v in value))
    return isinstance(value, shape)


def read_ours(path, shape, way_out, *, overwrite=False):
    """The JSON prism wrote at `path`; one not fitting `shape` is damaged (`overwrite`: None)."""
    try:
        stored = read_json(path, way_out)
        if fits(stored, shape):
            return stored
        raise damaged(path, f"its {' and '.join(shape)} are missing or malformed", way_out)
    except UsageError:
        if not overwrite:
            raise


def read_prompts(path, settings, *, overwrite=False):
    """(prompts, classes) of OUT/prompts.json if made under `settings`, else False or None."""
    entry = {"source": str, "scene_source": str, "prompts": [str, settings["per_class"]]}  # used
    stored = check_settings(path, settings, overwrite=overwrite, what="prompts") and read_ours(
        path, {"classes": [entry, *[len(settings["classes"])] * 2]}, overwrite=overwrite,
        way_out="rerun with --overwrite to remake the prompts")
    return stored and ([entry["prompts"] for entry in stored["classes"]], stored["classes"])


def read_llm_answers(path, *, overwrite):
    """OUT/llm_answers.json's {llm name: {question: answer}}; {} if none (or damaged: overwrite)."""
    stored = path.exists() and read_ours(path, {"answers": {str: {str: str}}}, overwrite=overwrite,
                                         way_out="delete it (a cache) or rerun with --overwrite")
    return stored["answers"] if stored else {}


def load_models(args, device):
    """(out, models): --out, the teacher, the untrained student (tried on --image-size now), the
    classes, `identity` (what decides the pixels), prompt settings (LLM found); --smoke: tiny."""
    if args.batch_size % rank_and_world()[1]:  # said now, not after hours of synthesis
        raise UsageError(f"--batch-size {args.batch_size} is global: it must be a multiple of the "
                         f"{rank_and_world()[1]} processes")
    models = types.SimpleNamespace(class_names="mouse crane kite tank".split(), descriptions=None)
    models.identity = {"sd_model": "tiny-random", "teacher": "tiny-random"}
    if args.smoke:
        models.teacher = build_tiny_classifier(4, seed=args.seed)
        models.teacher.to(device).eval().requires_grad_(False)
        models.student = build_tiny_classifier(4, width=8, input_size=args.image_size,
                                               seed=args.seed + 1)
    else:
        models.class_names, models.descriptions = load_class_names(args.data)
        locate_model(args.sd_model, "--sd-model")  # found or refused in seconds, before f_T loads
        with rank_zero_first():
            models.teacher = load_teacher(args.teacher, device, weights_path=args.teacher_weights,
                                          num_classes=len(models.class_names))[0]
        models.student = with_preprocessing(torchvision.models.get_model(  # random weights
            args.student, num_classes=len(models.class_names)), args.image_size)
        weights = args.teacher_weights  # a weights file changed under its name: another teacher
        models.identity = {"sd_model": args.sd_model, "teacher": args.teacher + (
            f" {hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]}" if weights else "")}
    models.identity["dtype"] = str(getattr(torch, args.dtype))
    try:
        with torch.no_grad():
            models.student.eval()(torch.zeros(2, 3, args.image_size, args.image_size))
    except RuntimeError as error:
        raise UsageError(f"the student refuses --image-size {args.image_size}: {first_line(error)}")
    models.student.train()
    ablate = sorted(set(args.ablate) - {"guidance"})
    models.llm = None if args.llm == "none" else "tiny-random" if args.smoke else args.llm
    models.prompt_settings = {
        "classes": models.class_names, "descriptions": models.descriptions,
        "per_class": args.per_class, "seed": args.seed, "photo_share": args.photo_share,
        "neighbours": args.neighbours, "llm": models.llm, "teacher": models.identity["teacher"],
        **({"scenes_per_class": args.scenes_per_class} if models.llm else {}),  # the LLM's alone
        **({"ablate": ablate} if ablate else {})}
    out = Path(args.out)  # the LLM the prompts need: found before SD loads, or its answers kept
    if models.llm and not (args.smoke or args.check_guidance) and not (
            read_prompts(out / "prompts.json", models.prompt_settings, overwrite=args.overwrite)
            or models.llm in read_llm_answers(out / "llm_answers.json", overwrite=args.overwrite)):
        from transformers import AutoConfig
        load_pretrained(args.llm, "--llm", "LLM", lambda source, local: AutoConfig.from_pretrained(
            source, local_files_only=local), "--llm none")
    return out, models


def labelled_test_sets(args, models):
    """The --val-dir sets (labelled_sets), checked now, and --pr-k against the sets it compares."""
    class_ids = args.class_ids and [row[0] for row in read_lines(
        args.class_ids, "--class-ids", len(models.class_names))]
    test_sets = labelled_sets(named_val_sets(args.val_dir), models.class_names, class_ids)
    first = test_sets[0] if test_sets else {"classes": models.class_names, "images": math.inf}
    smallest = min(len(first["classes"]) * args.per_class, first["images"])
    if args.pr_k >= smallest:
        raise UsageError(f"--pr-k {args.pr_k}: must be below {smallest}, the smaller set's size")
    return test_sets


def load_sampler(args, device, out, pipe=None):
    """The diffusion pipeline (`pipe`; else --sd-model, or with --smoke a tiny random one saved in
    OUT/tiny-models) with --scheduler and the memory format, the sampling flags checked on it."""
    if pipe is None:
        sd_model = out / "tiny-models" / "pipeline" if args.smoke else args.sd_model
        if args.smoke and rank_and_world()[0] == 0:
            random_pipeline(out / "tiny-models" / "vocab", image_size=args.height,
                            seed=args.seed).save_pretrained(sd_model)
        with rank_zero_first():
            pipe = load_diffusion_pipeline(sd_model, device, getattr(torch, args.dtype))
    for part in (pipe.unet, pipe.vae) if args.channels_last else ():  # faster on CUDA; same images
        part.to(memory_format=torch.channels_last)
    if args.scheduler != "model":
        import diffusers
        kind, kinds = getattr(diffusers, args.scheduler, None), pipe.scheduler.compatibles
        if kind not in kinds:
            raise UsageError(f"--scheduler {args.scheduler}: not one this model can use; give "
                             f"'model' or {', '.join(sorted(k.__name__ for k in kinds))}")
        try:
            pipe.scheduler = kind.from_config(pipe.scheduler.config)
        except ImportError:  # LMS needs scipy, DPM-Solver SDE torchsde: not in requirements.txt
            raise UsageError(f"--scheduler {args.scheduler} needs a missing package: use another")
    check_sampler(pipe, sampling_options(args))
    return pipe


@contextlib.contextmanager
def errors_reported(argv):
    """main()'s frame, yielding `status`: an error is one line on stderr (--debug in `argv`: and
    its traceback) and status.code 2 (UsageError, OSError), 1 (a failure) or 130 (Ctrl-C)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    status, debug = types.SimpleNamespace(code=0), "--debug" in argv
    try:
        yield status
    except (KeyboardInterrupt, Exception) as error:
        if debug:
            traceback.print_exception(error)
        status.code, kind, message = 1, "failed", f"{type(error).__name__}: {first_line(error)}" + (
            "" if debug else " (rerun with --debug for the traceback)")
        if isinstance(error, KeyboardInterrupt):
            status.code, kind, message = 130, "interrupted", "rerun the same command to resume"
        elif isinstance(error, (UsageError, OSError)):  # a loader worker's: traceback, then text
            status.code, kind, message = 2, "error", str(error).split("UsageError: ")[-1].strip()
        elif isinstance(error, RunFailure):
            message = str(error)
        elif isinstance(error, torch.OutOfMemoryError):
            message = ("out of GPU memory; rerun the same command with a smaller --gen-batch or "
                       "--guidance-batch: nothing done is redone")
        report(kind, message)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ── The stages main() runs: the method's functions with resume, processes and files around them ───
def sampling_options(args):
    """energy_guided_sample's keywords that the command line sets (all decide the pixels)."""
    guided = "guidance" not in args.ablate
    return dict(num_steps=args.steps, cfg_scale=args.cfg, temperature=args.energy_temperature,
                energy_scale=args.energy_scale * guided, class_scale=args.class_scale * guided,
                guidance_start=args.guidance_start, guidance_end=args.guidance_end,
                guidance_every=args.guidance_every, exact_grad=args.exact_grad,
                normalize_grad=not args.no_grad_norm, height=args.height, width=args.width)


def prompts_stage(args, out, models, device):
    """Stage 1 (§3): (prompts, their sources counted), made once on rank 0 by build_prompts with
    the command line's options, the LLM's answers cached, read by every rank from prompts.json."""
    path, answers_path = out / "prompts.json", out / "llm_answers.json"

    def make_prompts():
        cache = read_llm_answers(answers_path, overwrite=args.overwrite) if models.llm else {}
        classes = build_prompts(
            models.class_names, args.per_class, teacher=models.teacher, llm=build_tiny_llm(
                out / "tiny-models" / "llm") if models.llm == "tiny-random" else models.llm,
            descriptions=models.descriptions, answers=cache.setdefault(models.llm, {}),
            neighbours=args.neighbours, photo_share=args.photo_share, seed=args.seed,
            scenes_per_class=args.scenes_per_class, llm_device=device,
            disambiguate="disambiguation" not in args.ablate,
            vary_content="content" not in args.ablate, vary_style="style" not in args.ablate)[1]
        if models.llm:  # the other LLMs' answers are kept
            write_json_atomic({"answers": cache}, answers_path)
        write_json_atomic({"settings": models.prompt_settings, "classes": classes}, path)

    reuse = read_prompts(path, models.prompt_settings, overwrite=args.overwrite)
    barrier()  # every rank has its verdict before rank 0 may replace the file
    on_rank_zero(lambda: reuse or make_prompts())
    if args.prompts_only and rank_and_world()[0] == 0:
        print(f"prompts: {path}; read them, then rerun without --prompts-only")
    prompts, classes = read_prompts(path, models.prompt_settings)
    count = lambda key: dict(collections.Counter(entry[key] for entry in classes))  # noqa: E731
    return prompts, {"llm": models.llm, "description_sources": count("source"),
                     "scene_sources": count("scene_source")}


def synthesis_stage(args, out, models, prompts, pipe):
    """Stages 2-3 (§1-2): synthesize_dataset into OUT/synthetic and its contact sheet; returns
    its settings, None while images are missing (--max-new-images)."""
    rank, synthetic = rank_and_world()[0], out / "synthetic"
    if pipe.device.type == "cpu" and not args.smoke and rank == 0:  # once every input passed
        report("warning", "running on the CPU; a real run needs a CUDA GPU")
    files = synthesize_dataset(
        pipe, models.teacher, prompts, synthetic, per_class=args.per_class, seed=args.seed,
        batch_size=args.gen_batch, image_format=args.image_format,
        identity={**models.identity, "scheduler": type(pipe.scheduler).__name__},
        store_size=args.store_size or None, overwrite=args.overwrite,
        max_new_images=args.max_new_images, guidance_batch=args.guidance_batch,
        **sampling_options(args))
    wanted = len(models.class_names) * args.per_class
    if len(files) < wanted:
        if rank == 0:
            print(f"synthesis: {len(files)} of {wanted} images cached; rerun to continue")
        return None
    sheet = out / "contact_sheet.png"
    if rank == 0 and (not sheet.exists() or sheet.stat().st_mtime_ns  # older than the set
                      < (synthetic / "settings.json").stat().st_mtime_ns):
        contact_sheet(synthetic, sheet)
    return read_json(synthetic / "settings.json", "")["settings"]


def distillation_stage(args, out, models, data_settings, results, device):
    """Stage 4 (§4): distils into models.student on OUT/synthetic, resumed from OUT/checkpoint.pt;
    adds the KD losses to `results`. False while epochs are missing (--epochs-this-run)."""
    torch.cuda.empty_cache()  # what the diffusion model held
    if args.epochs == 0:
        return True
    options = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   temperature=args.kd_temperature, image_size=args.image_size,
                   weight_decay=args.weight_decay, seed=args.seed, crop_scale=args.crop_scale)
    # what decides the weights: these options and the data over distill's defaults
    config = {**KD, **options, "data": json.loads(json.dumps(data_settings))}
    path, checkpoint = out / "checkpoint.pt", None
    way_out = "rerun with --overwrite to restart training (the images are kept)"
    if path.exists():
        try:  # (distill checks the weights are finite before any checkpoint is written)
            checkpoint = torch.load(path, map_location=device, weights_only=True)
            parts = {"epoch": int, "history": list, "config": dict, "optimizer": dict,
                     "schedule": dict, "student": dict}
            if not fits(checkpoint, parts) or len(checkpoint["history"]) != checkpoint["epoch"]:
                raise ValueError("not a PRISM distillation checkpoint")
            copy.deepcopy(models.student).load_state_dict(checkpoint["student"])  # or it raises
            if checkpoint["config"] != config:
                raise UsageError(f"{path} was made under other settings ("
                                 f"{settings_difference(checkpoint['config'], config)}); {way_out}")
        except Exception as error:  # made under other settings, or damaged: any failure to load it
            if not args.overwrite:
                raise error if isinstance(error, UsageError) else damaged(path, error, way_out)
            checkpoint = None
    rank, world = rank_and_world()
    history = distill(models.teacher, models.student, out / "synthetic", **options, device=device,
                      num_workers=args.workers, channels_last=args.channels_last,
                      resume=checkpoint, stop_after=args.epochs_this_run,
                      on_epoch=lambda state: rank == 0 and save_torch_atomic(
                          {**state, "config": config}, path))
    if world > 1:  # DDP keeps the weights equal, not the BatchNorm statistics: rank 0's for all
        barrier()  # rank 0 may still be writing its checkpoint
        for tensor in models.student.state_dict().values():
            dist.broadcast(tensor, src=0)
    results["distill"] = {"epochs_done": len(history), "kd_loss": history}
    if rank == 0 and len(history) < args.epochs:
        print(f"distillation: {len(history)} of {args.epochs} epochs done; rerun to continue")
    elif rank == 0:
        save_torch_atomic(models.student.state_dict(), out / "student.pt")
    return len(history) == args.epochs


def measurement_stage(args, out, models, test_sets, results, device):
    """Stage 5 (§5): into OUT/results.json, the synthetic set in the teacher's features (against the
    first test set; --smoke without one: itself), teacher and student on every test set."""
    synthetic, n = out / "synthetic", len(models.class_names)
    if not test_sets and args.smoke:
        test_sets = labelled_sets([("synthetic", synthetic)], models.class_names)
    sizes = dict(image_size=models.teacher[0].input_size, resize_size=models.teacher[0].resize_size)
    options = dict(device=device, num_workers=args.workers)
    if rank_and_world()[0] == 0:  # one process measures; the others wait at the barrier below
        fake, fake_labels = extract_features(models.teacher, synthetic, **sizes, **options)
        head = last_linear_module(models.teacher)  # the features through it: the logits
        with torch.no_grad():
            logits = (head(fake.to(device)).cpu() if isinstance(head, nn.Linear) else fake).double()
        energy, top1 = teacher_energy(logits, args.energy_temperature), logits.argmax(-1)
        diversity = [torch.pdist(fake[fake_labels == c]).mean().item()  # within a class
                     if (fake_labels == c).sum() > 1 else 0.0 for c in fake_labels.unique()]
        results["synthetic"] = {  # what is measured without real data (§2, §5)
            "images": len(fake), "agreement": (top1 == fake_labels).double().mean().item(),
            "mean_energy": energy.mean().item(),
            "std_energy": energy.std().item() if len(fake) > 1 else 0.0,
            "mean_p_class": logits.softmax(-1).gather(1, fake_labels.view(-1, 1)).mean().item(),
            "diversity": sum(diversity) / len(diversity)}
        if test_sets:
            real = test_sets[0]
            real_features = extract_features(models.teacher, real["data"], **sizes, **options)[0]
            # a set of some classes (ImageNet-R first) is compared with those classes' images
            fake = fake[torch.isin(fake_labels, torch.tensor(real["classes"]))]
            results["precision_recall"] = {
                "set": real["name"], "data": real["data"], "classes": len(real["classes"]),
                "k": args.pr_k, "real_images": len(real_features), "synthetic_images": len(fake),
                **precision_recall(real_features.to(device), fake.to(device), k=args.pr_k)}
    barrier()
    for s in test_sets:  # every rank scores its share of each set
        k = len(s["classes"])
        entry = {"name": s["name"], "data": s["data"], "classes": k,
                 "protocol": f"all {k} classes" if k == n else f"restricted to {k} of {n} classes",
                 "mapping": s["mapping"], "folders": dict(zip(s["folders"], s["classes"])),
                 "teacher": evaluate(models.teacher, s["data"], classes=s["classes"], **sizes,
                                     **options)}
        if args.epochs > 0:
            entry["student"] = evaluate(models.student, s["data"], classes=s["classes"],
                                        image_size=args.image_size, **options)
            entry["gap_top1"] = entry["teacher"]["top1"] - entry["student"]["top1"]
        results.setdefault("evaluation", {"teacher_sizes": sizes, "sets": []})["sets"].append(entry)
    if rank_and_world()[0] == 0:
        write_json_atomic(results, out / "results.json")
        print(strict_json({key: results[key] for key in ("synthetic", "precision_recall")
                           if key in results}, indent=1))
        if "evaluation" in results:
            print(evaluation_table(results["evaluation"]["sets"], n))
        smoke = " (--smoke: plumbing, not accuracy)" if args.smoke else ""
        print(f"measured: {out / 'results.json'}; generated: {out / 'contact_sheet.png'}{smoke}")


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART III — TOOLS: reports for a person to read, tiny models, the benchmark
# ══════════════════════════════════════════════════════════════════════════════════════════
# ── Reports: the contact sheet, the evaluation table ──────────────────────────────────────────────
def spread(count, total):
    """min(count, total) indices spread evenly over range(total), first and last included."""
    count = min(count, total)
    return [round(k * (total - 1) / max(count - 1, 1)) for k in range(count)]


def contact_sheet(data_dir, path, *, max_classes=32, per_row=8, tile=64):
    """Writes a PNG of a set: the first `per_row` images of `max_classes` classes spread evenly."""
    folders = sorted(Path(data_dir).glob("[0-9]*"))
    rows = [sorted(folders[c].glob("[0-9]*"))[:per_row] for c in spread(max_classes, len(folders))]
    tiles = torch.stack([transforms.functional.to_tensor(read_image(p).resize((tile, tile)))
                         for row in rows for p in row])
    atomic_write(path, lambda temp: torchvision.utils.save_image(tiles, temp, nrow=len(rows[0]),
                                                                 format="PNG"))


def evaluation_table(sets, num_classes):
    """results.json's evaluation sets as a Markdown table: top-1 and top-5 in %."""
    return markdown_table(sets, {  # the student's columns: none with --epochs 0
        "set": "{name}", "images": "{teacher[images]}", "classes": f"{{classes}}/{num_classes}",
        "teacher top-1": "{teacher[top1]:.2f}", "teacher top-5": "{teacher[top5]:.2f}",
        "student top-1": "{student[top1]:.2f}", "student top-5": "{student[top5]:.2f}",
        "gap top-1": "{gap_top1:.2f}"})


# ── Tiny random components: the offline smoke run and the tests (plumbing, not accuracy) ──────────
def bpe_tokenizer(folder, kind, suffixes, special, **options):
    """A byte-level BPE tokenizer `kind` of no merges: a token per byte and suffix, `special`."""
    from tokenizers.pre_tokenizers import ByteLevel
    tokens = [a + suffix for suffix in suffixes for a in sorted(ByteLevel.alphabet())] + special
    vocab, merges = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text(json.dumps({token: n for n, token in enumerate(tokens)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    return kind(str(vocab), str(merges), **options)


def seeded(seed, build):
    """build() with torch's RNG seeded by `seed`; the caller's RNG state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


# "tiny": tests and the smoke run; "sd15": SD 1.5's UNet (860M), VAE (84M), text encoder (123M)
RANDOM_PIPELINES = {
    "tiny": dict(unet=dict(layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
                 vae=dict(block_out_channels=(32, 64)),
                 text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4)),
    "sd15": dict(unet=dict(cross_attention_dim=768),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
                 text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                           vocab_size=49408))}


def random_pipeline(vocab_dir, *, architecture="tiny", image_size=32, prediction_type="epsilon",
                    seed=0):
    """A frozen random StableDiffusionPipeline of RANDOM_PIPELINES[architecture], SD's DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    config, ends = RANDOM_PIPELINES[architecture], ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = bpe_tokenizer(vocab_dir, CLIPTokenizer, ("", "</w>"), ends, model_max_length=77)
    start, end = tokenizer.convert_tokens_to_ids(ends)
    levels = len(config["vae"]["block_out_channels"])  # the VAE's, and its 2^(levels-1) scale
    text_encoder, unet, vae = (part.requires_grad_(False) for part in seeded(seed, lambda: (
        CLIPTextModel(CLIPTextConfig(**{"vocab_size": len(tokenizer), **config["text"]},
                                     bos_token_id=start, eos_token_id=end, pad_token_id=end)),
        UNet2DConditionModel(sample_size=image_size // 2 ** (levels - 1), **config["unet"]),
        AutoencoderKL(sample_size=image_size, down_block_types=("DownEncoderBlock2D",) * levels,
                      up_block_types=("UpDecoderBlock2D",) * levels, **config["vae"]))))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type=prediction_type),
        feature_extractor=None, requires_safety_checker=False)


def build_tiny_llm(model_dir, *, seed=0):
    """Saves a tiny random GPT-2 (it answers random text) to `model_dir`, returned, for load_llm."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    tokenizer = bpe_tokenizer(model_dir, GPT2Tokenizer, ("",), ["<|endoftext|>"])
    seeded(seed, lambda: GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, bos_token_id=len(tokenizer) - 1,
        eos_token_id=len(tokenizer) - 1))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return Path(model_dir)


def build_tiny_classifier(num_classes, *, width=16, input_size=32, seed=0):
    """A small random CNN with BatchNorm and a final nn.Linear, taking [0, 1] images of any size."""
    return with_preprocessing(seeded(seed, lambda: nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))), input_size)


# ── --check-guidance and --benchmark: one process, timed; tables in OUT/NAME.md and .json ─────────
SAMPLING_MODES = {"unguided": dict(energy_scale=0.0, class_scale=0.0),
                  "guided, approx (default)": dict(exact_grad=False),
                  "guided, exact": dict(exact_grad=True)}
MODES_TABLE = {"sampling mode": "{mode}", "s / image": "{s_per_image:.3f}",
               "× unguided": "{vs_unguided:.2f}", "peak memory (GiB)": "{peak_memory_gib:.1f}",
               "energy": "{energy:.3f}", "p(y)": "{p_class:.4f}", "top-1 %": "{top1:.1f}"}


def timed(device, function):
    """(function(), seconds); on CUDA the queued work is awaited and a peak-memory count begins."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start, result = time.perf_counter(), function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def check_guidance(pipe, teacher, prompts, class_ids, latents, *, class_names, repeats=1,
                   **sample_kwargs):
    """Whether guidance does what §2 says: rows of "modes" (SAMPLING_MODES, the fastest of `repeats`
    rounds), "per_class" (unguided, approx) and "fidelity" (cosine of the exact gradient and g)."""
    options, ids = {**SAMPLER, **sample_kwargs}, torch.as_tensor(class_ids, device=pipe.device)
    seconds, memory, scores, traces = {}, {}, {}, {}
    # the rounds take the modes in turn: a drift hits them all alike
    for r, mode in tqdm(list(itertools.product(range(repeats), SAMPLING_MODES)), "timing modes"):
        sample, traces[mode] = dict(sample_kwargs, latents=latents, **SAMPLING_MODES[mode]), []
        if r == 0:  # warms the machine up
            energy_guided_sample(pipe, teacher, prompts, class_ids, **dict(sample, num_steps=2))
        (_, stats), took = timed(pipe.device, lambda: energy_guided_sample(
            pipe, teacher, prompts, class_ids, trace=traces[mode], **sample))
        seconds[mode] = min(seconds.get(mode, math.inf), took / len(prompts))
        if pipe.device.type == "cuda":  # (a CPU process has no peak of its own: no such column)
            memory[mode] = {"peak_memory_gib": torch.cuda.max_memory_allocated(pipe.device) / 2**30}
        scores[mode] = dict(stats, top1=100.0 * (stats["top1"] == ids).float())
    mean = lambda mode, keep=slice(None): {  # noqa: E731
        key: scores[mode][key][keep].mean().item() for key in ("energy", "p_class", "top1")}
    trace, fidelity = traces["guided, approx (default)"], []
    for entry in [trace[k] for k in sorted({0, len(trace) // 2, len(trace) - 1}) if trace]:
        _, exact = guidance_gradient(
            entry["predict"], pipe.vae, teacher, entry["noisy"], entry["alpha_bar"], ids,
            exact=True, batch_size=options["guidance_batch"],
            **{key: options[key] for key in ("energy_scale", "class_scale", "temperature")})
        cosine = F.cosine_similarity(exact.flatten(1).double(), entry["grad"].flatten(1).double())
        fidelity.append({"step": entry["step"], "steps": len(pipe.scheduler.timesteps),
                         "cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()})
    modes = [{"mode": m, "s_per_image": seconds[m], "vs_unguided": seconds[m] / seconds["unguided"],
              **memory.get(m, {}), **mean(m)} for m in SAMPLING_MODES]
    per_class = [{"class": c, "name": class_names[c], "images": class_ids.count(c), "unguided":
                  mean("unguided", ids == c), "guided": mean("guided, approx (default)", ids == c)}
                 for c in dict.fromkeys(class_ids)]
    return {"fidelity": fidelity, "modes": modes, "per_class": per_class}


def markdown_table(rows, columns):
    """A Markdown table of `rows` (dicts), `columns` {heading: str.format}, less those they lack."""
    columns = {heading: pattern for heading, pattern in columns.items()
               if not rows or set(re.findall(r"\{(\w+)", pattern)) <= rows[0].keys()}
    cells = [list(columns), ["---"] * len(columns)]
    cells += [[pattern.format(**row) for pattern in columns.values()] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in cells)


def benchmark_distillation(args, device, folder, teacher):
    """Rows of images/s, ÷ pure compute: the loader, distill()'s last of 3 epochs, kd_step alone;
    the student: resnet18 with random weights (--smoke: a tiny one)."""
    student = build_tiny_classifier(1000, width=8, input_size=args.image_size) if args.smoke else (
        seeded(1, lambda: with_preprocessing(torchvision.models.resnet18(), args.image_size)))
    shutil.rmtree(folder, ignore_errors=True)  # a fresh set
    generator, size = torch.Generator().manual_seed(0), min(args.height, args.store_size or 10**9)
    for n in range(8 * args.batch_size):  # smooth colours, mild noise: generated images' sizes
        image = F.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size, mode="bicubic")[0]
        path = folder / f"{n % 10:04d}" / f"{n:05d}.{args.image_format}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_atomic(image + 0.03 * torch.randn(image.shape, generator=generator), path)
    loader, sampler = kd_loader(folder, args.batch_size, image_size=args.image_size,
                                num_workers=args.workers, pin_memory=device.type == "cuda")
    for epoch in range(2):  # the first epoch starts the workers
        sampler.set_epoch(epoch)
        batches, loader_seconds = timed(device, lambda: [batch for batch, _ in loader])
    epochs = []  # distill() leaves the teacher and student on the device, warmed up
    distill(teacher, student, folder, epochs=3, batch_size=args.batch_size, lr=0.1,
            device=device, image_size=args.image_size, num_workers=args.workers,
            channels_last=args.channels_last, on_epoch=epochs.append)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [to_unit_images(batch, device, torch.channels_last if args.channels_last else
                              torch.contiguous_format) for batch in batches]
    _, compute_seconds = timed(device, lambda: [kd_step(
        teacher, student, optimizer, batch, ARGS.kd_temperature, amp) for batch in batches])
    seconds = {f"loader alone ({args.workers} workers: read, decode, augment, collate)":
               loader_seconds, "full KD loop (loader + copy + compute)":
               epochs[-1]["epoch_seconds"][-1],
               "pure compute (batches already on the device)": compute_seconds}
    return [{"part": part, "images_per_s": len(batches) * len(batches[0]) / s,
             "vs_compute": compute_seconds / s} for part, s in seconds.items()]


def run_tool(args, device):
    """--check-guidance: check_guidance() on --check-seeds images of --check-classes classes;
    --benchmark: on random weights, its modes (best of 2 rounds) and benchmark_distillation."""
    name = "benchmark" if args.benchmark else "check_guidance"
    if rank_and_world()[1] > 1:
        raise UsageError(f"--{name.replace('_', '-')} measures one process: drop torchrun")
    if args.benchmark:
        out, ids = Path(args.out), list(range(args.gen_batch))  # exclusive_out made --out
        args.height, args.width = args.height or 512, args.width or 512
        teacher = build_tiny_classifier(1000) if args.smoke else seeded(0, lambda: (
            with_preprocessing(torchvision.models.resnet50(), 224)))  # the same in every run
        pipe = load_sampler(args, device, out, random_pipeline(
            out / "benchmark" / "vocab", image_size=args.height,
            architecture="tiny" if args.smoke else "sd15").to(device, getattr(torch, args.dtype)))
        names = load_class_names("imagenet")[0][:args.gen_batch]
        prompts, seeds = [p[0] for p in build_prompts(names, 1)[0]], ids
    else:
        out, models = load_models(args, device)
        pipe, teacher, names = load_sampler(args, device, out), models.teacher, models.class_names
        table = build_prompts(names, args.check_seeds, teacher=teacher, seed=args.seed,
                              descriptions=models.descriptions, photo_share=args.photo_share,
                              neighbours=args.neighbours)[0]
        pairs = [(c, i) for c in spread(args.check_classes, len(names))
                 for i in range(args.check_seeds)]
        prompts, ids = [table[c][i] for c, i in pairs], [c for c, _ in pairs]
        seeds = [image_seed(args.seed, c, i) for c, i in pairs]
    latents = initial_latents(seeds, latent_shape(pipe, args.height, args.width))
    result = check_guidance(
        pipe, teacher.to(device).eval().requires_grad_(False), prompts, ids,
        latents.to(device, pipe.unet.dtype), class_names=names, repeats=1 + args.benchmark,
        guidance_batch=args.guidance_batch, **sampling_options(args))
    tables = [markdown_table(result["modes"], MODES_TABLE)]
    if args.benchmark:
        del pipe  # as in a real run, the diffusion model's memory goes to distillation
        distillation = benchmark_distillation(args, device, out / "benchmark" / "images", teacher)
        flags = ("height width steps gen_batch guidance_batch dtype batch_size image_size "
                 "workers store_size image_format channels_last").split()
        machine = " ".join([torch.cuda.get_device_name(device) if device.type == "cuda" else
                            "CPU", f"({os.cpu_count()} cores), torch {torch.__version__};",
                            *(f"--{k.replace('_', '-')} {vars(args)[k]}" for k in flags)])
        result = dict(machine=machine, sampling=result["modes"], distill=distillation)
        tables = [f"Machine: {machine}", *tables, markdown_table(distillation, {
            "distillation": "{part}", "images / s": "{images_per_s:.1f}",
            "/ pure compute": "{vs_compute:.2f}"})]
    else:
        tables = [markdown_table(result["fidelity"], {
            "guided step": "{step} of {steps}", "cosine of the exact gradient with the method's "
            "g (mean)": "{cosine_mean:.3f}", "(min)": "{cosine_min:.3f}"}), *tables,
            markdown_table(result["per_class"], {
                "class": "{class} {name}", "images": "{images}",
                "energy: unguided → guided": "{unguided[energy]:.3f} → {guided[energy]:.3f}",
                "p(y)": "{unguided[p_class]:.4f} → {guided[p_class]:.4f}",
                "top-1 %": "{unguided[top1]:.0f} → {guided[top1]:.0f}"})]
    text = "\n\n".join(tables)  # printed; kept in OUT/NAME.md, the numbers in OUT/NAME.json
    atomic_write(out / f"{name}.md", lambda temp: temp.write_text(text + "\n", encoding="utf-8"))
    write_json_atomic(result, out / f"{name}.json")
    print(text)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, main() reports it
    exit_code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # not Python's: its shutdown resets it to a kill
    sys.exit(exit_code)
