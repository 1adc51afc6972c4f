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

The file has three parts. Part I is the method, in the order data flows: the equations, the
stages, main(); each function takes the method's values as its own keyword defaults (the command
line reads them from there). Part II is plumbing (the stage functions main() runs, errors, files,
resume, several processes, the command line, model loading): nothing in it changes what is
computed. Part III holds tools: reports, tiny random models for the smoke run and tests, the
benchmark. Every function takes its inputs as arguments and its docstring names the § it
implements; a copy takes along UsageError, RunFailure and rank_and_world (Part II).
"""
import collections
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import stat
import sys
import time
import types
import traceback
import warnings
from datetime import timedelta
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
from torchvision import transforms
from tqdm.auto import tqdm


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART I — THE METHOD (§1-§5), in the order data flows
# ══════════════════════════════════════════════════════════════════════════════════════════
# ──────────────────────────────────────────────────────────────────────────────────────────
# The equations (§1, §2, §4), one small function each
# ──────────────────────────────────────────────────────────────────────────────────────────
def teacher_energy(logits, temperature=1.0):
    """The teacher's energy of each sample (§1, Liu et al. 2020): low on what it finds
    in-distribution. `logits` are f_T(x), `temperature` is τ."""
    # E(x) = -τ · logsumexp(f_T(x) / τ)
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def guidance_loss(logits, class_ids, *, energy_scale, class_scale,
                  temperature=1.0):
    """The guidance loss L(x, y) of §1 for each sample: energy (precision) plus the cross-entropy
    of the intended class y; `energy_scale` is s_E, `class_scale` s_C. Two scales rather than
    one scale and a ratio let either term be used alone."""
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


def scaled_vjp(outputs, inputs, vectors):
    """The vector-Jacobian product vᵀ·∂outputs/∂inputs per sample, in float32 (or wider). Per
    value, guidance gradients lie below float16's normal range, so a float16 backward pass would
    flush them to zero: each sample's v is scaled by a power of two to max|v| in [½, 1), the
    result scaled back (exact: in float32 this is autograd.grad; 0 and NaN stay as they are)."""
    vectors = at_least_float32(vectors.detach())
    peak = vectors.flatten(1).abs().amax(dim=1)
    # peak = m·2^e with m in [½, 1); v·2^-e has its largest value in [½, 1)
    exponent = torch.frexp(peak)[1].view(-1, *([1] * (vectors.dim() - 1)))
    scaled = torch.ldexp(vectors, -exponent).to(outputs.dtype)
    grad = torch.autograd.grad(outputs, inputs, grad_outputs=scaled)[0]
    return torch.ldexp(at_least_float32(grad), exponent)


def clean_latent_grad(vae, teacher, clean_latents, class_ids, *,
                      batch_size=4, **objective):
    """∇_{ẑ0} L(D(ẑ0), y) per sample (§2), in float32; `objective`: guidance_loss's scales and τ.
    D is the VAE decoder on the full-size ẑ0; the teacher scores D(ẑ0) in float32, and ∇_x L
    enters the decoder through scaled_vjp, so that a float16 decoder keeps its direction.
    `batch_size` samples at a time bound the decode's memory; it does not change the result."""
    grads = []
    for start in range(0, len(clean_latents), batch_size):
        latents = clean_latents[start:start + batch_size].detach().requires_grad_(True)
        with torch.enable_grad():
            images = decode_to_unit(vae, latents)
            pixels = at_least_float32(images.detach()).requires_grad_(True)
            logits = at_least_float32(teacher(pixels))
            loss = guidance_loss(logits, class_ids[start:start + batch_size], **objective)
            pixel_grad = torch.autograd.grad(loss.sum(), pixels)[0]
            grads.append(scaled_vjp(images, latents, pixel_grad))
    return torch.cat(grads)


def guidance_gradient(predict_epsilon, vae, teacher, noisy_latents, alpha_bar, class_ids, *,
                      exact=False, batch_size=4, **objective):
    """(ε̂, g) at z_t: the CFG noise prediction and g = ∇_{z_t} L(D(ẑ0(z_t)), y) (§2), g in float32;
    predict_epsilon(z, rows) gives ε̂ for the samples `rows` at z. approx (default): ε̂ held
    constant, no UNet backward pass. exact: through the UNet too, `batch_size` samples at a time."""
    if not exact:
        with torch.no_grad():
            epsilon = predict_epsilon(noisy_latents, slice(None))
        clean = tweedie_clean_latent(noisy_latents, epsilon, alpha_bar)
        grad = clean_latent_grad(vae, teacher, clean, class_ids, batch_size=batch_size, **objective)
        # g = ∇_{ẑ0} L · ∂ẑ0/∂z_t = ∇_{ẑ0} L / sqrt(ᾱ_t)
        return epsilon, grad / alpha_bar ** 0.5
    epsilons, grads = [], []
    for start in range(0, len(noisy_latents), batch_size):
        rows = slice(start, start + batch_size)
        noisy = noisy_latents[rows].detach().requires_grad_(True)
        with torch.enable_grad():
            epsilon = predict_epsilon(noisy, rows)
            clean = tweedie_clean_latent(noisy, epsilon, alpha_bar)
            clean_grad = clean_latent_grad(vae, teacher, clean, class_ids[rows],
                                           batch_size=batch_size, **objective)
            # g = (∂ẑ0/∂z_t)ᵀ · ∇_{ẑ0} L, through the UNet's ε̂(z_t)
            grads.append(scaled_vjp(clean, noisy, clean_grad))
        epsilons.append(epsilon.detach())
    return torch.cat(epsilons), torch.cat(grads)


def per_sample_norm(x):
    """Euclidean norm of each sample of a batch, shaped to broadcast over it."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def apply_guidance(epsilon, grad, alpha_bar, *, total_scale, normalize):
    """ε̂' = ε̂ + sqrt(1-ᾱ_t)·g (§2), and `finite`: False for a sample whose g is not finite (left
    unguided). With `normalize`, g is first rescaled per sample to total_scale·‖ε̂‖ (s_E + s_C:
    fractions of the noise prediction). In float32 whatever ε̂'s dtype: in float16, tiny norms
    underflow and their ratios overflow."""
    epsilon32, grad32 = at_least_float32(epsilon), at_least_float32(grad)
    finite = torch.isfinite(grad32.flatten(1)).all(dim=1)
    grad32 = torch.where(finite.view(-1, *([1] * (grad.dim() - 1))), grad32, 0.0)
    if normalize:
        # g/‖g‖ computed as u/‖u‖ with u = g/max|g|, which cannot underflow; a zero g stays zero
        peak = grad32.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(grad32.dtype).tiny)
        unit = grad32 / peak.view(-1, *([1] * (grad.dim() - 1)))
        unit = unit / per_sample_norm(unit).clamp_min(1.0)  # ‖u‖ ≥ 1 unless u = 0
        # g ← (s_E + s_C)·‖ε̂‖·g/‖g‖
        grad32 = total_scale * per_sample_norm(epsilon32) * unit
    # ε̂' = ε̂ + sqrt(1-ᾱ_t)·g
    return (epsilon32 + (1 - alpha_bar) ** 0.5 * grad32).to(epsilon.dtype), finite


def kd_loss(student_logits, teacher_logits, temperature=10.0):
    """The distillation loss of Hinton et al. 2015 (§4), the batch mean; `temperature` is τ_kd.
    The τ_kd² keeps gradient magnitudes comparable across temperatures."""
    # L_KD = τ_kd² · KL(softmax(f_T/τ_kd) ‖ softmax(f_S/τ_kd))
    return F.kl_div(F.log_softmax(student_logits.float() / temperature, dim=-1),
                    F.log_softmax(teacher_logits.float() / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2


# ──────────────────────────────────────────────────────────────────────────────────────────
# The teacher: its own preprocessing folded in, so every stage hands it [0, 1] images
# ──────────────────────────────────────────────────────────────────────────────────────────
class Preprocess(nn.Module):
    """Maps images in [0, 1] of any size to what a classifier expects: resize + normalise.

    Folding preprocessing into the model lets every stage (guidance, KD, evaluation) hand it
    plain [0, 1] images, and keeps the resize differentiable for the guidance gradient (§2).
    `resize_size` is the shorter side real images are resized to before the centre crop of
    evaluation (eval_transform): the classifier's own protocol (resnet50's V2 weights: 232).
    """

    def __init__(self, input_size, mean, std, resize_size=None):
        super().__init__()
        self.input_size = int(input_size)
        self.resize_size = resize_size or round(self.input_size / 0.875)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images):
        # fp16 images from the diffusion model → fp32 classifier
        images = images.to(self.mean.dtype)
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.mean) / self.std


def eval_sizes(classifier):
    """The evaluation sizes of a with_preprocessing classifier: its own crop and resize."""
    return {"image_size": classifier[0].input_size, "resize_size": classifier[0].resize_size}


def with_preprocessing(model, input_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       resize_size=None):
    """Returns nn.Sequential(Preprocess, model): a classifier that takes [0, 1] images of any size.
    """
    return nn.Sequential(Preprocess(input_size, mean, std, resize_size), model)


# ──────────────────────────────────────────────────────────────────────────────────────────
# Stage 1. Diversified prompts (§3): "{style} of {name}, {description}, {scene}"
# ──────────────────────────────────────────────────────────────────────────────────────────
# Style diversification. Photos serve accuracy on photos; the rest serve domain generalisation.
PHOTO_STYLES = (
    "a photo", "a close-up photo", "a DSLR photo", "a wide-angle photo", "a candid photo",
    "a professional photo", "a snapshot", "a slightly blurry photo", "a black and white photo",
    "a low-light photo", "a high-resolution photo", "a cropped photo", "a phone photo",
    "a macro photo", "a telephoto photo", "a vintage photo",
)


OTHER_STYLES = (
    "a pencil sketch", "an oil painting", "a watercolor painting", "a cartoon", "a 3D render",
    "an embroidery", "a plastic toy", "a clay sculpture", "a tattoo", "an origami model",
    "a pixel-art image", "a graffiti", "a woodcut print", "a plush toy", "a video game screenshot",
    "a children's drawing",
)


# Content without an LLM: whole scene phrases, each written as one coherent scene (place, view
# and light together), grouped by the kind of thing they suit. A class gets the group of its
# category (below); "any" suits everything and serves classes whose category is unknown.
SCENES = {
    "animal": ("in tall grass on a sunny afternoon", "resting in the shade of a tree",
               "walking across an open field at dawn", "in its natural habitat, seen from the side",
               "close up, looking at the camera", "in a forest clearing in soft light",
               "on a rock under an overcast sky", "in the snow on a winter morning"),
    "water": ("swimming in clear blue water", "underwater among rocks and sea plants",
              "at the surface of a calm lake", "in an aquarium with soft lighting",
              "near the shore on a bright day", "seen from above in shallow water",
              "in a river among stones", "in the open sea on a cloudy day"),
    "plant": ("growing in a garden in morning light", "in a meadow on a sunny day",
              "close up with dew drops", "growing by a sunny window indoors",
              "in a forest after rain",
              "seen from above on the ground", "under glass in soft light",
              "in a park on an overcast day"),
    "food": ("served on a wooden table", "served at a dinner in warm light",
             "on a kitchen counter, seen from above", "at a market stall in daylight",
             "on a picnic blanket outdoors", "close up on a dark background",
             "on a cutting board in a home kitchen", "on a cafe table by the window"),
    "vehicle": ("on a city street in daylight", "parked by the road at sunset",
                "driving on a country road", "in a parking lot on an overcast day",
                "seen from the side on a highway", "in a garage under bright lights",
                "at a crossing in the rain", "on display at a show"),
    "object": ("on a wooden table in soft window light", "held in a person's hand",
               "on a shelf in a store", "on a table, seen from above",
               "on a plain white background", "next to everyday things on a counter",
               "in use at home in the evening",
               "close up in bright daylight"),
    "indoor": ("in a bright living room", "in a kitchen in morning light",
               "on display in a showroom",
               "in a room, seen from the doorway", "on a plain white background",
               "in a cosy apartment in the evening", "in a store among others for sale",
               "close up in soft light"),
    "clothing": ("worn by a person on a city street", "hanging on a rail at home",
                 "folded on a bed in soft light", "on a mannequin in a shop window",
                 "worn outdoors on an autumn day", "laid flat on a plain background",
                 "worn by a person at home", "on a clothes rail in a store"),
    "place": ("on a clear sunny day", "at sunset with long shadows", "seen from far away",
              "on a misty morning", "from a low angle under a blue sky", "in winter with snow",
              "at night under lights", "seen from above"),
    "any": ("in soft natural light", "close up", "seen from the side", "in bright daylight",
            "in the center of the frame", "seen from a distance", "in warm evening light",
            "on an overcast day"),
}


# Categories a class's teacher neighbours can point to (§3, no LLM), each with its scene group.
CATEGORIES = {
    "mammal": "animal", "bird": "animal", "reptile": "animal", "frog": "animal",
    "insect": "animal", "dog": "animal", "cat": "animal", "monkey": "animal", "fish": "water",
    "sea creature": "water", "plant": "plant", "flower": "plant", "fungus": "plant",
    "fruit": "food", "vegetable": "food", "dish": "food", "drink": "food", "car": "vehicle",
    "truck": "vehicle", "military vehicle": "vehicle", "train": "vehicle", "bicycle": "vehicle",
    "boat": "place", "aircraft": "place", "electronic device": "object", "tool": "object",
    "weapon": "object", "musical instrument": "indoor", "household appliance": "indoor",
    "furniture": "indoor", "container": "object", "kitchenware": "object", "toy": "object",
    "sports equipment": "object", "machine": "place", "garment": "clothing",
    "accessory": "clothing", "building": "place", "structure": "place", "landscape": "place",
}


def with_article(phrase):
    """'a mouse', 'an iron': the article CLIP's captions use before a noun phrase."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def names_any(text, names, own=""):
    """True if `text` names one of `names` as whole words (any case, plurals too) once the
    class's `own` name is taken out: a phrase that would have the diffusion model draw another
    class. "ant" is not in "elephant"; "tiger" is not named by "tiger cat" itself."""
    if own:
        text = re.sub(rf"\b{re.escape(own)}\b", " ", text, flags=re.IGNORECASE)
    words = re.findall(r"[\w'-]+", text.lower())
    spans = {" ".join(words[i:i + n]) for n in range(1, 6) for i in range(len(words) - n + 1)}
    spans |= {span[:-1] for span in spans if span.endswith("s")}  # plurals: kites, foxes
    spans |= {span[:-2] for span in spans if span.endswith("es")}
    return any(name.lower() in spans for name in names)


def free_of_classes(phrases, class_names):
    """The phrases of a built-in list (SCENES, CATEGORIES) that name no class of `class_names`:
    "on a white plate" would have ImageNet's "plate" drawn into every image it is given to."""
    return [phrase for phrase in phrases if not names_any(phrase, class_names)]


def last_linear_module(model):
    """The last nn.Linear met walking `model.modules()` (a scripted one in TorchScript too), or
    None: a classifier's head. Its weight (C, D) has one row per class, its input is the penultimate
    layer."""
    linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear) or getattr(module, "original_name", None) == "Linear":
            linear = module
    return linear


def nearest_classes(weight, k):
    """For each class, the k other classes whose classifier weight rows are most cosine-similar.

    The teacher's last linear layer holds one weight vector per class, so its neighbours are a
    data-free context for an ambiguous name (§3): mouse → computer keyboard, desktop computer.
    """
    unit = F.normalize(weight.detach().float(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(k, len(unit) - 1), dim=1).indices.tolist()


def neighbour_names(class_names, teacher, k):
    """For each class, the names of its k teacher-nearest classes (nearest_classes), or [] for
    every class when k is 0 or the teacher has no last linear layer with one row per class."""
    head = last_linear_module(teacher) if teacher is not None and k > 0 else None
    if head is None or head.weight.shape[0] != len(class_names) or len(class_names) < 2:
        return [[] for _ in class_names]
    return [[class_names[j] for j in row] for row in nearest_classes(head.weight, k)]


@torch.no_grad()
def text_embeddings(text_encoder, texts, batch_size=256):
    """Unit-length CLIP text embeddings (the pooled output) of `texts`, float32 on the CPU;
    text_encoder = (tokenizer, CLIPTextModel), e.g. (pipe.tokenizer, pipe.text_encoder)."""
    tokenizer, model = text_encoder
    pooled = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(texts[start:start + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        pooled.append(model(ids.to(model.device)).pooler_output.float().cpu())
    return F.normalize(torch.cat(pooled), dim=-1)


def neighbour_categories(neighbours, text_encoder, categories=tuple(CATEGORIES)):
    """The category each class's teacher neighbours point to (§3 without an LLM), None for a class
    without neighbours. With T the unit CLIP text embedding of "a photo of a {x}":

        category(c) = argmax_k cos(T(k), mean_{n ∈ neighbours(c)} T(n))

    The neighbours name the sense ("mouse" next to computer keyboard and desktop computer points
    to "electronic device"), yet only the category enters the prompt, so they are not drawn."""
    names = sorted({n for row in neighbours for n in row})
    if not names:
        return [None] * len(neighbours)
    embedded = text_embeddings(text_encoder, [f"a photo of {with_article(x)}" for x in
                                              [*categories, *names]])
    category_rows, name_rows = embedded[:len(categories)], embedded[len(categories):]
    index = {name: i for i, name in enumerate(names)}
    result = []
    for row in neighbours:
        if not row:
            result.append(None)
            continue
        # mean_{n ∈ neighbours(c)} T(n), then the nearest category by cosine
        centre = F.normalize(name_rows[[index[n] for n in row]].mean(0), dim=0)
        result.append(categories[(category_rows @ centre).argmax().item()])
    return result


def llm_questions(name, neighbours, scenes_per_class):
    """The two questions the LLM is asked about one class (§3): what it is, and where it is seen.
    The teacher's neighbours go into the question only, to tell which sense is meant."""
    sense = f" (the sense close to {' and '.join(neighbours)})" if neighbours else ""
    describe = (f"An image classifier has a class named '{name}'{sense}. In at most 8 words, say "
                f"what a '{name}' is, as a noun phrase. Do not name other things it is near.")
    scenes = (f"List {scenes_per_class} different scenes in which a photo of a '{name}'{sense} "
              f"is really taken: where it is seen, with what, from which viewpoint, in which "
              f"light. One scene per line, at most 12 words each, no numbering.")
    return describe, scenes


def llm_generate(llm, instructions, *, max_new_tokens=96, batch_size=16):
    """Greedy completions of `instructions` by llm = (model, tokenizer): one string each.

    Greedy decoding (our choice) makes prompts a deterministic function of the inputs, with no
    random state to seed. A chat template is used when the tokenizer has one.
    """
    model, tokenizer = llm
    chat = getattr(tokenizer, "chat_template", None) is not None
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True) if chat else text + "\n"
             for text in instructions]
    completions = []
    for start in tqdm(range(0, len(texts), batch_size), desc="llm", unit="batch",
                      disable=len(texts) <= batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=not chat).to(model.device)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                              skip_special_tokens=True)
    return completions


def ask_llm(llm, questions, answers, *, max_new_tokens, device="cpu"):
    """The LLM's answers to `questions`: from `answers` (a question → answer dict, updated in
    place) where it holds them, from the LLM for the rest. `llm` is a loaded (model, tokenizer)
    or a name, loaded only when a question is new. Returns (answers, llm)."""
    missing = [question for question in dict.fromkeys(questions) if question not in answers]
    if missing:
        llm = load_llm(llm, device) if isinstance(llm, (str, os.PathLike)) else llm
        answers.update(zip(missing, llm_generate(llm, missing, max_new_tokens=max_new_tokens)))
    return [answers[question] for question in questions], llm


def describe_classes(class_names, *, descriptions=None, neighbours=None, text_encoder=None,
                     vary_content=True):
    """What the prompts of each class say besides their style, without an LLM (§3): one dict
    per class with "description" and its "source" ("file", "neighbours" or "name"), "scenes" and
    their "scene_source", its teacher "neighbours" and their "category".

    Description, best source first: the user's file; "a kind of {category}", the category the
    teacher's neighbours point to (neighbour_categories, which needs a CLIP `text_encoder`);
    none, leaving the bare name. Scenes: the built-in SCENES of the category's group ("any"
    without a category). Categories and scenes that name a class are never used (a prompt
    names no class but its own). add_llm_answers then puts the LLM's answers in."""
    neighbours = neighbours or [[] for _ in class_names]
    allowed = free_of_classes(CATEGORIES, class_names)  # no category names a class
    categories = (neighbour_categories(neighbours, text_encoder, allowed)
                  if text_encoder is not None else [None] * len(class_names))
    scenes = {group: free_of_classes(phrases, class_names) for group, phrases in SCENES.items()}
    classes = []
    for c, name in enumerate(class_names):
        group = CATEGORIES.get(categories[c], "any")
        group = group if scenes[group] else "any"
        entry = {"name": name, "description": "", "source": "name", "neighbours": neighbours[c],
                 "category": categories[c], "scenes": [], "scene_source": "none"}
        if descriptions and descriptions[c]:
            entry.update(description=descriptions[c], source="file")
        elif categories[c]:
            entry.update(description=f"a kind of {categories[c]}", source="neighbours")
        if vary_content and scenes[group]:
            entry.update(scenes=list(scenes[group]), scene_source=f"built-in {group}")
        classes.append(entry)
    return classes


def add_llm_answers(classes, llm, answers, *, describe=True, vary_content=True,
                    scenes_per_class=12, device="cpu"):
    """Puts the LLM's answers into describe_classes' entries (§3): its description of what the
    class is (llm_description; not for a class described by the user's file) and its scenes
    (clean_line, whole_phrase: one per line, in order, without repeats). An answer that names
    one of the class's teacher neighbours is dropped, since the diffusion model would draw that
    other class; so is an empty one and a description that is only the name. An answer that
    cleaning changed is kept as the LLM wrote it in the entry's "llm_raw", for prompts.md.
    `answers` caches the LLM (ask_llm). Returns `classes`."""
    asked = [llm_questions(e["name"], e["neighbours"], scenes_per_class) for e in classes]
    todo = [c for c, entry in enumerate(classes) if describe and entry["source"] != "file"]
    # room for a chat preamble before the answer
    described, llm = ask_llm(llm, [asked[c][0] for c in todo], answers, max_new_tokens=48,
                             device=device)
    for c, answer in zip(todo, described):
        entry, description = classes[c], llm_description(answer, classes[c]["name"])
        if names_any(description, entry["neighbours"], entry["name"]) or re.sub(
                r"^(?:a|an|the) ", "", description.lower()) == entry["name"].lower():
            description = ""
        if description:
            entry.update(description=description, source="llm")
        if description != answer.strip():
            entry.setdefault("llm_raw", {})["description"] = answer
    if not vary_content:
        return classes
    listed, _ = ask_llm(llm, [q[1] for q in asked], answers, device=device,
                        max_new_tokens=32 * scenes_per_class)
    for entry, answer in zip(classes, listed):
        scenes = dict.fromkeys(whole_phrase(clean_line(line)) for line in answer.splitlines())
        scenes = [s for s in scenes if s and not names_any(s, entry["neighbours"], entry["name"])
                  ][:scenes_per_class]
        if scenes:
            entry.update(scenes=scenes, scene_source="llm")
        if scenes != [line.strip() for line in answer.splitlines() if line.strip()]:
            entry.setdefault("llm_raw", {})["scenes"] = answer
    return classes


def compose_prompts(classes, per_class, *, photo_share=0.8, seed=0,
                    vary_style=True):
    """`per_class` prompts for each of describe_classes' entries (§3):

        prompt(c, i) = "{style} of {name of c}, {description}, {scene}"   (empty parts left out)

    Image i takes a photo style with probability `photo_share` (another style otherwise) and the
    next (style, scene) pair of that kind from the class's shuffled list of all such pairs, so a
    class repeats a prompt only once every pair has been used. Deterministic for a seed."""
    prompts = []
    for c, entry in enumerate(classes):
        rng = random.Random(f"prism-prompts/{seed}/{c}")  # str seeds are stable across runs
        subject = ", ".join(filter(None, (with_article(entry["name"]), entry["description"])))
        pools = []
        for styles in (PHOTO_STYLES, OTHER_STYLES) if vary_style else (("a photo",),) * 2:
            pairs = [(style, scene) for scene in entry["scenes"] or [""] for style in styles]
            rng.shuffle(pairs)
            pools.append(itertools.cycle(pairs))
        pairs = [next(pools[0] if rng.random() < photo_share else pools[1])
                 for _ in range(per_class)]
        prompts.append([f"{style} of {subject}" + (f", {scene}" if scene else "")
                        for style, scene in pairs])
    return prompts


def build_prompts(class_names, per_class, *, teacher=None, descriptions=None, llm=None,
                  text_encoder=None, answers=None, neighbours=2,
                  photo_share=0.8, seed=0,
                  scenes_per_class=12, llm_device="cpu", disambiguate=True,
                  vary_content=True, vary_style=True):
    """Returns (prompts, classes): `per_class` prompts per class, deterministic for a seed, and
    describe_classes' entry per class, which says where each part came from (§3).

    The teacher's `neighbours` nearest classes (by its last linear layer) tell which sense of a
    name is meant; `llm` (a name or a loaded (model, tokenizer); None: the built-in lists) writes
    descriptions and scenes; `text_encoder` (CLIP: (tokenizer, model)) turns the neighbours into
    a category without an LLM. Ablations (§5): `disambiguate=False` keeps the bare name (no file
    descriptions, neighbours or LLM description), `vary_content=False` drops the scene and
    `vary_style=False` makes every style "a photo"."""
    if not disambiguate:
        descriptions, neighbours = None, 0
    near = neighbour_names(class_names, teacher, neighbours)
    classes = describe_classes(class_names, descriptions=descriptions, neighbours=near,
                               text_encoder=text_encoder, vary_content=vary_content)
    if llm is not None and (disambiguate or vary_content):
        add_llm_answers(classes, llm, {} if answers is None else answers, describe=disambiguate,
                        vary_content=vary_content, scenes_per_class=scenes_per_class,
                        device=llm_device)
    prompts = compose_prompts(classes, per_class, photo_share=photo_share, seed=seed,
                              vary_style=vary_style)
    return prompts, classes


# ──────────────────────────────────────────────────────────────────────────────────────────
# Stage 2. Energy-guided sampling (§1-2): the teacher's energy steers the sampler
# ──────────────────────────────────────────────────────────────────────────────────────────
def guided_step_indices(num_steps, start, end, every):
    """Indices i of the sampling steps that get guidance: start ≤ i / num_steps < end, every k-th.
    `num_steps` is the scheduler's own count of timesteps (PNDM makes one more than asked)."""
    first, last = math.ceil(start * num_steps), min(num_steps, math.ceil(end * num_steps))
    return set(range(first, last, every))


def epsilon_predictor(unet, timestep, text, uncond, cfg_scale, alpha_bar, prediction_type):
    """predict(z, rows): the CFG prediction as ε̂ for the samples `rows` of the batch at step t."""
    def predict(noisy_latents, rows):
        output = cfg_prediction(unet, noisy_latents, timestep, text[rows],
                                None if uncond is None else uncond[rows], cfg_scale)
        return to_epsilon(output, noisy_latents, alpha_bar, prediction_type)
    return predict


def denoise(pipe, teacher, latents, text, uncond, class_ids, *, generator, cfg_scale, guided_steps,
            exact_grad, normalize_grad, guidance_batch, guidance_vae, trace, **objective):
    """The sampling loop (§2), initial to final latents; on `guided_steps` ε̂ becomes ε̂' before
    the scheduler's own step. Returns (latents, skipped): per sample, the guided steps whose g
    was not finite (left unguided there)."""
    scheduler, unet, kind = pipe.scheduler, pipe.unet, pipe.scheduler.config.prediction_type
    step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
    skipped = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
    for i, t in enumerate(scheduler.timesteps):
        # the UNet sees scale_model_input(latents): the variance-preserving z_t for every scheduler
        noisy = scheduler.scale_model_input(latents, t)
        if i in guided_steps:
            alpha_bar = alpha_bar_at(scheduler, t)
            predict = epsilon_predictor(unet, t, text, uncond, cfg_scale, alpha_bar, kind)
            # ε̂ and g = ∇_{z_t} L(D(ẑ0(z_t)), y)
            epsilon, grad = guidance_gradient(predict, guidance_vae, teacher, noisy, alpha_bar,
                                              class_ids, exact=exact_grad,
                                              batch_size=guidance_batch, **objective)
            # ε̂' = ε̂ + sqrt(1 - ᾱ_t)·g
            total_scale = objective["energy_scale"] + objective["class_scale"]  # s_E + s_C
            guided, finite = apply_guidance(epsilon, grad, alpha_bar, total_scale=total_scale,
                                            normalize=normalize_grad)
            output, skipped = from_epsilon(guided, noisy, alpha_bar, kind), skipped + ~finite
            if trace is not None:  # for check_guidance: the states where g was taken
                trace.append({"step": i, "timestep": t, "alpha_bar": alpha_bar,
                              "noisy": noisy.detach().clone(), "grad": grad.detach().clone()})
        else:
            with torch.no_grad():
                output = cfg_prediction(unet, noisy, t, text, uncond, cfg_scale)
        latents = scheduler.step(output.detach(), t, latents, **step_kwargs, return_dict=False)[0]
    return latents, skipped


def encode_prompts(pipe, prompts, cfg_scale):
    """(text, uncond) CLIP embeddings of the prompts and of the empty prompt; uncond is None when
    classifier-free guidance is off (w ≤ 1, or a UNet distilled to take w as an input)."""
    do_cfg = cfg_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    with torch.no_grad():
        text, uncond = pipe.encode_prompt(prompts, pipe.device, 1, do_cfg)
    return text, uncond if do_cfg else None


def latent_shape(pipe, height=None, width=None):
    """(channels, h, w) of one latent for images of height × width (default: the model's size)."""
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    return pipe.unet.config.in_channels, height // factor, width // factor


@torch.no_grad()
def energy_guided_sample(pipe, teacher, prompts, class_ids, *, latents=None, generator=None,
                         num_steps=50, cfg_scale=3.0, energy_scale=0.25, class_scale=0.25,
                         guidance_start=0.1, guidance_end=0.7, guidance_every=2,
                         exact_grad=False, normalize_grad=True, temperature=1.0, height=None,
                         width=None, guidance_batch=4, guidance_vae=None, trace=None):
    """One image per prompt from a diffusers StableDiffusionPipeline, steered by the teacher (§2),
    guided on the steps in [guidance_start, guidance_end) of the trajectory, every k-th. With
    both scales 0 it is exactly `pipe(prompts, latents=latents, num_inference_steps=num_steps,
    guidance_scale=cfg_scale, output_type="pt")`. Returns images in [0, 1] (float32) and per
    image the teacher's final "energy", "top1", "p_class", "guidance_skipped" (steps whose g
    was not finite) and "resampled_unguided" (remade unguided from the same noise: no NaN
    image is returned). `generator`: one per image, for stochastic schedulers; `guidance_vae`
    decodes for g instead of the pipeline's VAE; `trace` (a list) receives each guided g."""
    scheduler, device = pipe.scheduler, pipe.device
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the model's own image size
    class_ids = torch.as_tensor(class_ids, device=device)
    # the same preparation as StableDiffusionPipeline.__call__, through its own methods
    text, uncond = encode_prompts(pipe, prompts, cfg_scale)
    scheduler.set_timesteps(num_steps, device=device)
    start = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, height or size,
                                 width or size, text.dtype, device, generator, latents)
    noise_states = [g.get_state() for g in generator] if isinstance(generator, list) else None
    guided_steps = set() if not (energy_scale or class_scale) else guided_step_indices(
        len(scheduler.timesteps), guidance_start, guidance_end, guidance_every)
    loop = dict(cfg_scale=cfg_scale, exact_grad=exact_grad, normalize_grad=normalize_grad,
                guidance_batch=guidance_batch, guidance_vae=guidance_vae or pipe.vae, trace=trace,
                energy_scale=energy_scale, class_scale=class_scale, temperature=temperature)
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
    if not torch.isfinite(images).all():  # the model fails even unguided: no image of NaN
        raise UsageError(f"the diffusion model gives non-finite pixels even without guidance "
                         f"(in {text.dtype}): run it in float32 (--dtype float32) or check it")
    logits = at_least_float32(teacher(images))
    return images, {"energy": teacher_energy(logits, temperature), "top1": logits.argmax(dim=-1),
                    "p_class": logits.softmax(-1).gather(1, class_ids.view(-1, 1)).squeeze(1),
                    "guidance_skipped": skipped, "resampled_unguided": resampled}


# ──────────────────────────────────────────────────────────────────────────────────────────
# Stage 3. The synthetic set: every image made once, with its seed and teacher scores
# ──────────────────────────────────────────────────────────────────────────────────────────
def derived_seed(*parts):
    """A 63-bit seed hashed from `parts`: independent streams for every (purpose, seed, ...) tuple.
    """
    digest = hashlib.sha256("/".join(["prism", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def image_seed(seed, class_index, image_index):
    """The seed of image (class, index): a hash of (seed, class, index), so each image can be
    regenerated alone, whatever the batch size, the number of processes or where a run resumed."""
    return derived_seed(seed, class_index, image_index)


def initial_latents(seeds, shape):
    """Stacks one N(0, I) latent of `shape` per seed, drawn on the CPU so every device sees the same
    noise."""
    return torch.stack([torch.randn(shape,
                                    generator=torch.Generator().manual_seed(s)) for s in seeds])


def class_folder(class_index, num_classes):
    """Zero-padded folder name of a class, so that sorted folder names are the class order."""
    return str(class_index).zfill(max(4, len(str(num_classes - 1))))


def resize_for_storage(images, store_size):
    """Images with their shorter side brought down to `store_size` (antialiased bilinear; aspect
    kept), or unchanged when None or already that small: the distillation copy at training scale,
    a fraction of the bytes to store and decode."""
    height, width = images.shape[-2:]
    if not store_size or min(height, width) <= store_size:
        return images
    size = (store_size, round(width * store_size / height)) if height <= width else \
        (round(height * store_size / width), store_size)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                         antialias=True).clamp(0, 1)


def synthesize_dataset(pipe, teacher, prompts, out_dir, *, per_class, seed=0,
                       batch_size=8, image_format="png",
                       store_size=None, identity=None, overwrite=False, max_new_images=None,
                       progress=True, guidance_vae=None, guidance_batch=4,
                       **sample_kwargs):
    """Generates and caches `per_class` images per class; returns the manifest records, sorted.

    Image (c, i) is energy_guided_sample of prompts[c][i] from the noise of image_seed(seed, c, i),
    written to `out_dir/<class>/<index>.<ext>` (an ImageFolder tree) with its shorter side at
    `store_size` (None: as generated), and recorded in `manifest.jsonl` with its seed and the
    teacher's numbers of the full-size image (energy, top-1, p_class). `sample_kwargs` go to the
    sampler and, with `identity` (the models' names), into `settings.json`; `guidance_batch`, a
    memory bound like `batch_size`, does not. A rerun makes only what is missing; other settings
    are a UsageError unless `overwrite` (open_image_set). `max_new_images` stops early, for
    time-limited jobs. Under torchrun the missing images are dealt out to the ranks; every image
    is written atomically before its record (README: "Resuming, and what is never lost")."""
    rank, world = rank_and_world()
    out_dir, num_classes = Path(out_dir), len(prompts)
    settings = synthesis_settings(prompts, per_class=per_class, seed=seed, identity=identity or {},
                                  image_format=image_format, sample_kwargs=sample_kwargs,
                                  store_size=store_size)
    open_image_set(out_dir, settings, num_classes, overwrite=overwrite)
    file_of = image_files(num_classes, per_class, image_format)
    digest = settings_digest(settings)
    wanted, missing = images_to_make(out_dir, file_of, num_classes, per_class, max_new_images,
                                     digest)
    todo = missing[rank::world]
    shape = latent_shape(pipe, sample_kwargs.get("height"), sample_kwargs.get("width"))
    bar = tqdm(total=len(wanted) if world == 1 else len(todo), unit="img",
               initial=len(wanted) - len(missing) if world == 1 else 0,
               desc="synthesis" if world == 1 else f"synthesis, rank 0's share of {len(missing)}",
               disable=not progress or rank != 0)
    with bar:  # closed (its line ended) before an error message is printed
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            seeds = [image_seed(seed, c, i) for c, i in batch]
            latents = initial_latents(seeds, shape).to(pipe.device, pipe.unet.dtype)
            # stochastic schedulers' step noise: one generator per image, so an image is a
            # function of its own seed whatever batch it is made in
            step_noise = [torch.Generator().manual_seed(derived_seed("step-noise", s))
                          for s in seeds]
            images, stats = energy_guided_sample(
                pipe, teacher, [prompts[c][i] for c, i in batch], [c for c, _ in batch],
                latents=latents, generator=step_noise, guidance_vae=guidance_vae,
                guidance_batch=guidance_batch, **sample_kwargs)
            images = resize_for_storage(images, store_size)  # the teacher saw the full size
            records = [save_generated(images[k], out_dir, file_of(c, i), c, i, prompts[c][i],
                                      seeds[k], {key: v[k] for key, v in stats.items()}, digest)
                       for k, (c, i) in enumerate(batch)]
            append_to_journal(out_dir / f"manifest.rank{rank}.jsonl", records)
            bar.update(len(batch))
    return merge_journals(out_dir, wanted)


def image_files(num_classes, per_class, image_format):
    """file_of(c, i): the path of image i of class c in the set, relative to its folder."""
    digits = max(5, len(str(per_class - 1)))
    return lambda c, i: f"{class_folder(c, num_classes)}/{str(i).zfill(digits)}.{image_format}"


# ──────────────────────────────────────────────────────────────────────────────────────────
# Stage 4. Knowledge distillation (§4): the student matches the teacher's soft outputs
# ──────────────────────────────────────────────────────────────────────────────────────────
class SeededAugmentation(torch.utils.data.Dataset):
    """Item epoch·N + i of an N-image dataset, augmented with a seed of its own, derived from
    (seed, epoch, i): image i gets the same crop and flip in epoch e whichever process, worker or
    run loads it. So data-loading workers can persist across epochs, and a resumed or multi-GPU
    run still sees the augmentations of an uninterrupted single-process one."""

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


def kd_loader(data_dir, batch_size, *, image_size=224,
              crop_scale=0.08, num_workers=0,
              seed=0, pin_memory=False):
    """(loader, sampler) of KD batches from the ImageFolder tree `data_dir`, this rank's share.

    Each image is augmented once (random resized crop, flip: SeededAugmentation) and travels as
    uint8 (a quarter of float32's bytes through worker queues, pinned memory and the copy to the
    GPU); to_unit_images makes it float [0, 1] on the device. `batch_size` is global: each of N
    ranks takes batch_size / N. Full batches only (BatchNorm cannot train on a ragged batch of
    one); a set smaller than one batch is a single batch. Workers persist across epochs."""
    rank, world = rank_and_world()
    augment = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(crop_scale, 1)),
                                  transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    dataset = SeededAugmentation(torchvision.datasets.ImageFolder(data_dir), augment, seed)
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
    """A uint8 batch from kd_loader as float images in [0, 1] on `device`: x / 255, computed there.
    """
    batch = batch.to(device, non_blocking=True).to(memory_format=memory_format)
    return batch.float().div_(255)


def kd_step(teacher, student, optimizer, images, temperature, amp=contextlib.nullcontext()):
    """One KD step (§4) on a batch already on its device: the teacher's logits (no gradient), the
    student's forward and backward pass on the same images, an optimiser step. Returns the loss."""
    with amp:
        with torch.no_grad():
            teacher_logits = teacher(images)
        loss = kd_loss(student(images), teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: gradients averaged over the ranks here
    optimizer.step()
    return loss.detach()


def kd_optimizer(student, *, lr, momentum, weight_decay, total_steps):
    """(optimizer, schedule): SGD with Nesterov momentum and a cosine learning rate per step,
    lr_t = lr · ½(1 + cos(π t / total_steps)) (our choices)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    # lr_t = lr · ½(1 + cos(π t / T))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return optimizer, schedule


def kd_epoch(teacher, model, optimizer, schedule, loader, *, temperature, amp, device,
             memory_format, description, progress=True):
    """One pass of kd_step over `loader` (the sampler set to its epoch), the schedule stepped
    after each batch. Returns (sum of the batch losses, batches, the last batch)."""
    total, count, batch = torch.zeros((), device=device), 0, None
    with tqdm(loader, desc=description, unit="batch", disable=not progress) as batches:
        for batch, _ in batches:
            batch = to_unit_images(batch, device, memory_format)
            total = total + kd_step(teacher, model, optimizer, batch, temperature, amp)
            schedule.step()
            count += 1
    return total.item(), count, batch  # .item() waits for the GPU


def student_is_finite(student, batch, amp=contextlib.nullcontext()):
    """True if every weight of the student and its outputs on `batch` (as it will be used: eval
    mode) are finite. Weights can be finite yet so large that every output overflows."""
    if not all(torch.isfinite(t).all() for t in student.state_dict().values()
               if t.is_floating_point()):
        return False
    student.eval()
    with torch.no_grad(), amp:
        finite = bool(torch.isfinite(student(batch)).all())
    student.train()
    return finite


def distill(teacher, student, data_dir, *, epochs, batch_size, lr, temperature=10.0, device="cpu",
            image_size=224, crop_scale=0.08, weight_decay=1e-4, momentum=0.9, num_workers=0,
            seed=0, channels_last=False, progress=True, resume=None, stop_after=None,
            on_epoch=None):
    """Trains `student` (in place) on the cached images in `data_dir` by KD from `teacher` (§4)
    and returns the mean KD loss of every epoch done. Each batch is augmented once (random resized
    crop, flip) and shown to the teacher (online, frozen) and to the student. `batch_size` and
    `lr` are global: under torchrun each rank trains on its share (DistributedDataParallel).

    After each epoch `on_epoch(state)` receives {epoch, history, epoch_seconds, student,
    optimizer, schedule}; given back as `resume`, training goes on after that epoch as if it had
    never stopped (all randomness derives from (seed, epoch, image)). `stop_after` epochs end
    this call early. A loss, weight or output that stops being finite is a RunFailure before
    on_epoch sees it. bf16 autocast on CUDA; `channels_last` for faster convolutions."""
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
    optimizer, schedule = kd_optimizer(student, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                       total_steps=epochs * (len(sampler) // loader.batch_size))
    state = {"epoch": 0, "history": [], "epoch_seconds": []}
    if resume is not None:
        for part, saved in ((student, "student"), (optimizer, "optimizer"), (schedule, "schedule")):
            part.load_state_dict(resume[saved])
        state = {key: copy.deepcopy(resume.get(key, [])) for key in state}
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(state["epoch"], min(epochs, state["epoch"] + (stop_after or epochs))):
        started = time.perf_counter()
        sampler.set_epoch(epoch)  # the shuffle of epoch e: the same permutation on every rank
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derived_seed("distill", seed, epoch, rank))  # e.g. dropout
            loss_sum, batches, last = kd_epoch(
                teacher, model, optimizer, schedule, loader, temperature=temperature, amp=amp,
                device=device, memory_format=memory_format, progress=progress and rank == 0,
                description=f"distill {epoch + 1}/{epochs}")
        # summed over the ranks: the loss, the batches, and the ranks whose student fails
        totals = torch.tensor([loss_sum, batches, not student_is_finite(student, last, amp)],
                              dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(totals)
        if not math.isfinite(totals[0]) or totals[2] > 0:
            raise RunFailure(f"distillation diverged in epoch {epoch + 1} (KD loss {totals[0]:.4g}"
                             f"; its weights or outputs are not finite); epoch {epoch} was the "
                             f"last good one. The learning rate {lr} is likely too high: lower "
                             f"--lr and rerun with --overwrite (the images are kept)")
        state["history"].append(totals[0].item() / max(totals[1].item(), 1))
        state["epoch_seconds"].append(time.perf_counter() - started)
        state["epoch"] = epoch + 1
        if on_epoch is not None:
            on_epoch({**state, "student": student.state_dict(),
                      "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    return state["history"]


# ──────────────────────────────────────────────────────────────────────────────────────────
# Stage 5. Precision and recall of the synthetic set (§5), accuracy on real test sets
# ──────────────────────────────────────────────────────────────────────────────────────────
def knn_radii(features, k, batch_size=1024):
    """Distance from every row of `features` to its k-th nearest other row: the radius of its
    k-NN ball (§5). Blocks of `batch_size` rows keep memory at O(batch_size × N)."""
    if len(features) <= k:
        raise UsageError(f"k-NN radii need more than k={k} points, got {len(features)}")
    # the (k + 1)-th smallest distance: each point is its own 1st
    radii = [torch.cdist(features[start:start + batch_size], features).kthvalue(k + 1, dim=1).values
             for start in range(0, len(features), batch_size)]
    return torch.cat(radii)


def precision_recall(real_features, fake_features, k=3,
                     batch_size=1024):
    """Precision and recall (Kynkäänniemi et al., NeurIPS 2019) and density and coverage (Naeem et
    al., ICML 2020) of fake features against real ones (§5), with Euclidean k-NN balls B(x, r_k(x))
    whose radius r_k is the distance to the k-th nearest neighbour within the point's own set:

        precision = 1/M · Σ_j 1[ ∃ i: ‖y_j − x_i‖ < r_k(x_i) ]       fakes inside the real manifold
        recall    = 1/N · Σ_i 1[ ∃ j: ‖x_i − y_j‖ < r_k(y_j) ]       reals inside the fake manifold
        density   = 1/(kM) · Σ_j Σ_i 1[ ‖y_j − x_i‖ < r_k(x_i) ]     real balls around each fake
        coverage  = 1/N · Σ_i 1[ min_j ‖x_i − y_j‖ < r_k(x_i) ]      real balls that hold any fake

    x: the N real rows, y: the M fake rows. Strict "<" as in the authors' code. Distances are
    computed in blocks of `batch_size` fake rows against all real rows, so 100,000 × 50,000
    features never need the full distance matrix; the dtype and device are those of the inputs.
    """
    real_radii = knn_radii(real_features, k, batch_size)
    fake_radii = knn_radii(fake_features, k, batch_size)
    device, dtype = real_features.device, real_features.dtype
    inside_real = 0  # fakes inside at least one real ball (precision)
    real_ball_hits = 0  # (fake, real ball) pairs (density)
    real_in_fake = torch.zeros(len(real_features), dtype=torch.bool, device=device)  # recall
    nearest_fake = torch.full((len(real_features),), math.inf, dtype=dtype, device=device)
    for start in range(0, len(fake_features), batch_size):
        # (block, N): this block of fakes against every real row
        distances = torch.cdist(fake_features[start:start + batch_size], real_features)
        in_real_ball = distances < real_radii.unsqueeze(0)
        inside_real += in_real_ball.any(dim=1).sum().item()
        real_ball_hits += in_real_ball.sum().item()
        real_in_fake |= (distances < fake_radii[start:start + batch_size].unsqueeze(1)).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, distances.min(dim=0).values)
    return {"precision": inside_real / len(fake_features),
            "recall": real_in_fake.sum().item() / len(real_features),
            "density": real_ball_hits / (k * len(fake_features)),
            "coverage": (nearest_fake < real_radii).sum().item() / len(real_features)}


def eval_transform(image_size, resize_size=None):
    """The evaluation protocol: the shorter side resized to `resize_size` (default: the usual
    image_size/0.875), a centre crop of image_size, a [0, 1] tensor."""
    return transforms.Compose([transforms.Resize(resize_size or round(image_size / 0.875)),
                               transforms.CenterCrop(image_size),
                               transforms.ToTensor()])


def eval_loader(dataset, batch_size, num_workers, device):
    """A DataLoader over `dataset` in order (num_workers None: default_workers())."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, pin_memory=torch.device(device).type == "cuda",
        num_workers=default_workers() if num_workers is None else num_workers)


@torch.no_grad()
def extract_features(teacher, data_dir, *, classes=None, image_size=224,
                     resize_size=None, batch_size=100, device="cpu",
                     num_workers=0, progress=True):
    """Teacher features of every image of an ImageFolder tree, in its order: (features (N, D),
    labels (N,)), float32 on the CPU, under eval_transform(image_size, resize_size). The
    features are the input of the teacher's last nn.Linear: the global-pooled penultimate layer
    of a CNN (§5). A TorchScript teacher (no hooks) gives its logits as features instead. Labels:
    the class of each sorted folder in `classes` (class_mapping), else its position."""
    loader = eval_loader(image_folder(data_dir, eval_transform(image_size, resize_size), classes),
                         batch_size, num_workers, device)
    teacher.to(device).eval()
    head, captured = last_linear_module(teacher), []
    hook = (head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
            if isinstance(head, nn.Linear) else None)  # TorchScript modules take no hooks
    features, labels = [], []
    try:
        with tqdm(loader, desc=f"features of {Path(data_dir).name}", unit="batch",
                  disable=not progress) as batches:
            for images, targets in batches:
                captured.clear()
                logits = teacher(images.to(device))
                features.append((captured[-1] if captured else logits).flatten(1).float().cpu())
                labels.append(targets)
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(features), torch.cat(labels)


def mean_pairwise_distance(features):
    """Mean Euclidean distance over all pairs of rows: the diversity of one class's images (0 for <
    2)."""
    return torch.pdist(features).mean().item() if len(features) > 1 else 0.0


def lowest(entries, key, count):
    """Names of the `count` entries with the lowest `key` (ties: class order), skipping missing
    values."""
    scored = [entry for entry in entries if entry.get(key) is not None]
    return [entry["name"] for entry in sorted(scored, key=lambda entry: entry[key])[:count]]


def synthetic_set_report(records, features, class_names, *, worst=10):
    """What can be measured without real data (§2, §5), overall and per class, from the manifest
    `records` (sorted by class, index) and the teacher `features` of the same images in that order:
    agreement (share of images whose teacher top-1 is the intended class), the mean and spread of
    the final teacher energy, and diversity (mean pairwise feature distance within a class). The
    `worst` classes by agreement and by diversity are named: there prompts or guidance fail."""
    labels = torch.tensor([r["class"] for r in records])
    energies = torch.tensor([math.nan if r["energy"] is None else r["energy"] for r in records],
                            dtype=torch.float64)  # None: a teacher that gave NaN (strict JSON)
    agree = torch.tensor([r["top1"] == r["class"] for r in records], dtype=torch.float64)
    per_class = []
    for c, name in enumerate(class_names):
        mine = labels == c
        per_class.append({"class": c, "name": name, "images": int(mine.sum()),
                          "agreement": agree[mine].mean().item() if mine.any() else None,
                          "mean_energy": energies[mine].mean().item() if mine.any() else None,
                          "std_energy": energies[mine].std().item() if mine.sum() > 1 else None,
                          "diversity": mean_pairwise_distance(features[mine])})
    return {"images": len(records), "agreement": agree.mean().item(),
            "mean_energy": energies.mean().item(),
            "std_energy": energies.std().item() if len(records) > 1 else 0.0,
            "mean_p_class": sum(math.nan if r["p_class"] is None else r["p_class"]
                                for r in records) / len(records),
            "guidance_skipped_images": sum(r.get("guidance_skipped", 0) > 0 for r in records),
            "resampled_unguided_images": sum(bool(r.get("resampled_unguided")) for r in records),
            "diversity": sum(entry["diversity"] for entry in per_class) / len(per_class),
            "lowest_agreement": lowest(per_class, "agreement", worst),
            "lowest_diversity": lowest(per_class, "diversity", worst), "per_class": per_class}


def precision_recall_report(real_features, real_labels, fake_features, fake_labels, class_names, *,
                            k=3,
                            batch_size=1024, worst=10):
    """precision_recall of the synthetic set against real images (§5): overall, and per class
    (class-conditional: synthetic class c against real class c). A class with k or fewer images
    on either side has no per-class numbers (None). The `worst` classes by precision and by recall
    are named."""
    per_class = []
    for c, name in enumerate(class_names):
        real, fake = real_features[real_labels == c], fake_features[fake_labels == c]
        entry = {"class": c, "name": name, "real_images": len(real), "synthetic_images": len(fake)}
        enough = min(len(real), len(fake)) > k
        metrics = ("precision", "recall", "density", "coverage")
        for metric, value in (precision_recall(real, fake, k, batch_size) if enough else
                              dict.fromkeys(metrics)).items():
            entry[metric] = value
        per_class.append(entry)
    return {"k": k, "real_images": len(real_features), "synthetic_images": len(fake_features),
            **precision_recall(real_features, fake_features, k, batch_size),
            "lowest_precision": lowest(per_class, "precision", worst),
            "lowest_recall": lowest(per_class, "recall", worst), "per_class": per_class}


@torch.no_grad()
def evaluate(model, data_dir, *, classes=None, batch_size=100, device="cpu",
             image_size=224, resize_size=None, num_workers=0,
             progress=True):
    """Top-1 and top-5 accuracy (%) of a [0, 1]-image classifier on an ImageFolder tree under
    eval_transform(image_size, resize_size). `classes`: the model class of each sorted class folder
    (class_mapping); None: the sorted folders are the classes 0, 1, … of the model, all of them.
    A set of K classes is scored over those K logits only: for K below the model's outputs that
    is the ImageNet-R/-A protocol (200 of 1000 classes), for a full set it is every logit.
    Several processes: rank r scores images r, r+N, r+2N, ... and the counts are summed, so every
    rank returns exactly the single-process numbers."""
    rank, world = rank_and_world()
    dataset = image_folder(data_dir, eval_transform(image_size, resize_size), classes)
    model.to(device).eval()
    # on every rank, even one without a share
    outputs = model(dataset[0][0].unsqueeze(0).to(device)).shape[-1]
    if classes is None and outputs != len(dataset.classes):
        raise UsageError(f"{data_dir} has {len(dataset.classes)} class folders but the model has "
                         f"{outputs} outputs")
    subset = torch.tensor(sorted(range(len(dataset.classes)) if classes is None else classes))
    if subset.max() >= outputs:
        raise UsageError(f"{data_dir} holds class {subset.max().item()} but the model has "
                         f"{outputs} outputs")
    share = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = eval_loader(share, batch_size, num_workers, device)
    top1 = top5 = 0
    with tqdm(loader, desc="evaluate", unit="batch", disable=not progress or rank != 0) as batches:
        for images, labels in batches:
            logits = model(images.to(device))[:, subset.to(device)]
            # restricted logits: the k best are S[topk_j f(x)_{S_j}] over the set's classes S
            best = subset[logits.topk(min(5, len(subset)), dim=-1).indices.cpu()]
            top1 += (best[:, 0] == labels).sum().item()
            top5 += (best == labels.view(-1, 1)).any(dim=1).sum().item()
    top1, top5 = sum_over_ranks([top1, top5])
    return {"top1": 100.0 * top1 / len(dataset), "top5": 100.0 * top5 / len(dataset),
            "images": len(dataset)}


def evaluate_sets(sets, teacher, student, num_classes, *, teacher_sizes=None, **evaluation):
    """results.json's "evaluation": each of labelled_sets' `sets` scored (evaluate, with
    `evaluation`'s options) for the teacher and, unless None, the student, side by side with the
    teacher → student top-1 gap, how its folders were mapped, and per folder its class.
    `teacher_sizes` (image_size, resize_size) is the teacher's own evaluation protocol, so that
    its top-1 is the one published for its weights."""
    entries, teacher_options = [], {**evaluation, **(teacher_sizes or {})}
    for s in sets:
        k = len(s["classes"])
        entry = {"name": s["name"], "data": s["data"], "classes": k,
                 "protocol": (f"all {k} classes" if k == num_classes else
                              f"restricted to {k} of {num_classes} classes"),
                 "mapping": s["mapping"], "teacher_sizes": teacher_sizes,
                 "teacher": evaluate(teacher, s["data"], classes=s["classes"], **teacher_options)}
        if student is not None:
            entry["student"] = evaluate(student, s["data"], classes=s["classes"], **evaluation)
            entry["gap_top1"] = entry["teacher"]["top1"] - entry["student"]["top1"]
        entry["per_class"] = [{"folder": f, "class": c} for f, c in zip(s["folders"], s["classes"])]
        entries.append(entry)
    return {"sets": entries}


# ──────────────────────────────────────────────────────────────────────────────────────────
# main(): the stages in sequence
# ──────────────────────────────────────────────────────────────────────────────────────────
def main(argv=None):
    """PRISM on the command line: the stages in sequence, each reused from --out when it is done
    (rerun the same command to resume). Returns the exit code: 0; 2 for bad input or damaged
    state in --out; 1 for a failed run; 130 when interrupted (one line on stderr for each)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with errors_reported(argv) as status:  # Part II: any error → one line and an exit code
        args = parse_args(argv)  # every flag checked
        device = init_distributed(args.device)  # joins torchrun's processes, when there are some
        with exclusive_out(args.out):  # one run at a time per --out
            if args.benchmark or args.check_guidance:  # tools (Part III): they measure, not distil
                (run_benchmark if args.benchmark else run_check_guidance)(args, device)
                return 0
            out, models = load_models(args, device)  # f_T, f_S, the classes; cheap checks first
            check_llm_available(args, out, models.prompt_settings)  # found, or its answers kept
            test_sets = [] if args.prompts_only else labelled_test_sets(args, models)
            pipe, guidance_vae = load_sampler(args, device, out)

            # Stage 1 (§3): prompts, made once (rank 0, with the LLM), kept in prompts.json.
            prompts, classes = prompts_stage(args, out, models, pipe, device)
            if args.prompts_only:
                return prompts_written(out)

            # Stages 2-3 (§1-2): energy-guided synthesis of the set, cached in OUT/synthetic.
            records, data = synthesis_stage(args, out, models, prompts, classes, pipe,
                                            guidance_vae)
            del pipe, guidance_vae  # the diffusion model leaves the GPU before training
            if records is None:
                return 0

            # Stage 4 (§4): distillation, resumed from OUT/checkpoint.pt.
            results = {"ablate": args.ablate, "scheduler": data["scheduler"],
                       "prompts": prompt_sources(classes, models.llm)}
            if not distillation_stage(args, out, models, data, results, device):
                return 0

            # Stage 5 (§5): the set against real images; teacher and student on each test set.
            measurement_stage(args, out, models, records, test_sets, results, device)
            write_results(args, out, results, len(models.class_names))
    return status.code


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART II — PLUMBING. Nothing below changes what is computed: errors, files, resume, labelled
# folders, several processes, model loading and the command line.
# ══════════════════════════════════════════════════════════════════════════════════════════
import argparse
import torch.distributed as dist


# The command line's defaults, each written once: a flag of the method reads its default from the
# signature of the Part I function that uses it (keyword_defaults); build_parser offers each field
# with its help as the flag --field-name.
def keyword_defaults(function):
    """{name: default} of `function`'s keywords: a method's values, written once, in Part I."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def flag(default, text, **options):
    """A field of a defaults class and its command-line flag: the default, the help text and
    command-line options (type, when the default does not give it; action; nargs; choices)."""
    return dataclasses.field(default=default, metadata={"help": text, **options})


SAMPLER, PROMPTING = keyword_defaults(energy_guided_sample), keyword_defaults(build_prompts)
NORMALISATION = keyword_defaults(with_preprocessing)
CACHING, KD = keyword_defaults(synthesize_dataset), keyword_defaults(distill)


@dataclasses.dataclass(frozen=True)
class RunDefaults:
    """run"""
    out: str = flag("runs/prism", "output folder: prompts, images, checkpoints, results")
    seed: int = flag(0, "seed of prompts, image noise and training")
    device: str = flag("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...; under "
                       "torchrun each process takes cuda:LOCAL_RANK (NCCL), or the CPU (gloo)")
    workers: int | None = flag(None, "data loading processes per torchrun process (default: "
                               "the cores this process may use, shared by the node's "
                               "processes, minus one, at most 12: 12 decode about 6,000 "
                               "images/s, enough for one GPU)", type=int)


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """models and classes"""
    teacher: str = flag("resnet50", "torchvision classifier name or TorchScript file")
    teacher_weights: str | None = flag(None, "state dict for a torchvision --teacher instead of "
                                       "downloading", type=str)
    teacher_input_size: int = flag(224, "input size of a TorchScript teacher")
    teacher_mean: tuple = flag(NORMALISATION["mean"], "mean of a TorchScript teacher",
                               type=float, nargs=3)
    teacher_std: tuple = flag(NORMALISATION["std"], "std of a TorchScript teacher",
                              type=float, nargs=3)
    data: str = flag("imagenet", "'imagenet' or a class list file: one "
                     "'name[<TAB>description]' a line")
    student: str = flag("resnet18", "torchvision classifier trained from scratch")
    sd_model: str = flag("stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion "
                         "1.x/2.x hub id or local folder")
    llm: str = flag("Qwen/Qwen2.5-1.5B-Instruct", "instruction-tuned causal LM (hub id or local "
                    "folder) that describes each class and writes its scenes (§3); none: the "
                    "built-in lists and the teacher's neighbours, no LLM")


@dataclasses.dataclass(frozen=True)
class PromptDefaults:
    """prompts (§3)"""
    per_class: int = flag(100, "synthetic images (and prompts) per class")
    photo_share: float = flag(PROMPTING["photo_share"], "share of prompts in a photo style; "
                              "the rest: sketch, painting, cartoon, ...")
    neighbours: int = flag(PROMPTING["neighbours"], "teacher-nearest classes that tell which "
                           "sense of a class name is meant (0: off); they are never drawn")
    scenes_per_class: int = flag(PROMPTING["scenes_per_class"], "scenes the LLM writes for each "
                                 "class")
    prompts_only: bool = flag(False, "write OUT/prompts.json and a readable OUT/prompts.md (per "
                              "class: description, its source, sample prompts), then stop: "
                              "read it before the long run", action="store_true")


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """energy-guided sampling (§1-2)"""
    steps: int = flag(SAMPLER["num_steps"], "T, denoising steps")
    cfg: float = flag(SAMPLER["cfg_scale"], "classifier-free guidance scale w (low favours "
                      "diversity; <= 1 turns classifier-free guidance off)")
    energy_scale: float = flag(SAMPLER["energy_scale"], "s_E, weight of the teacher energy E")
    class_scale: float = flag(SAMPLER["class_scale"], "s_C, weight of the class cross-entropy")
    energy_temperature: float = flag(SAMPLER["temperature"], "τ of the energy "
                                     "E = -τ logsumexp(f/τ)")
    guidance_start: float = flag(SAMPLER["guidance_start"], "guidance window start, fraction "
                                 "of steps (a window holding no step is refused)")
    guidance_end: float = flag(SAMPLER["guidance_end"], "guidance window end, fraction of steps")
    guidance_every: int = flag(SAMPLER["guidance_every"], "guide every k-th step inside the "
                               "window")
    scheduler: str = flag("DDIMScheduler", "a diffusers scheduler class, made from the model's "
                          "own scheduler config, or 'model' for the model's own (SD 1.5: PNDM). "
                          "A multistep scheduler (PNDM, LMS, DPM++, UniPC, DEIS, Heun) reuses "
                          "past steps' ε̂, so guiding only some steps see-saws: it is refused "
                          "unless every step is guided")
    exact_grad: bool = flag(False, "differentiate through the UNet (slower)", action="store_true")
    no_grad_norm: bool = flag(False, "do not rescale g to (s_E+s_C)·‖ε̂‖", action="store_true")
    guidance_batch: int = flag(SAMPLER["guidance_batch"], "images per guidance decode with its "
                               "backward pass (about 3 GiB each at 512² in float16): bounds "
                               "guidance memory whatever --gen-batch is; the result does not "
                               "depend on it")
    gen_batch: int = flag(CACHING["batch_size"], "images per sampling batch (per torchrun "
                          "process)")
    height: int | None = flag(None, "image height (default: the model's)", type=int)
    width: int | None = flag(None, "image width (default: the model's)", type=int)
    image_format: str = flag(CACHING["image_format"], "cached image format (jpg: quality 95, "
                             "smaller and faster to decode, lossy)", choices=("png", "jpg"))
    max_new_images: int | None = flag(None, "generate at most this many images now (job time "
                                      "limits)", type=int)
    store_size: int = flag(320, "cache images with their shorter side at this size (0: as "
                           "generated); the teacher's energy and p(y) are recorded at full size")


@dataclasses.dataclass(frozen=True)
class DistillDefaults:
    """distillation (§4)"""
    epochs: int = flag(100, "KD epochs over the synthetic set (0: no distillation)")
    epochs_this_run: int | None = flag(None, "train at most this many epochs now (job time "
                                       "limits)", type=int)
    batch_size: int = flag(256, "global KD batch size (split over torchrun processes)")
    lr: float = flag(0.1, "peak SGD learning rate for the global batch (cosine decay)")
    weight_decay: float = flag(KD["weight_decay"], "SGD weight decay")
    kd_temperature: float = flag(KD["temperature"], "τ_kd of the KD loss (DM-KD's)")
    crop_scale: float = flag(KD["crop_scale"], "smallest share of an image a KD crop covers: "
                             "RandomResizedCrop's scale (s, 1) (torchvision's and DM-KD's)")
    image_size: int = flag(KD["image_size"], "student (and KD crop) input size")


@dataclasses.dataclass(frozen=True)
class MeasureDefaults:
    """measuring the synthetic set (§5), evaluation and ablations"""
    pr_k: int = flag(keyword_defaults(precision_recall)["k"], "k of the k-NN balls of "
                     "precision, recall, density, coverage")
    sheet_classes: int = flag(32, "classes shown in contact_sheet.png (spread evenly)")
    val_dir: list | None = flag(None, "real labelled images, one folder per class, evaluated "
                                "for teacher and student; repeat it for shifted test sets "
                                "(ImageNet-V2, -Sketch, -R, -A). The first is the "
                                "in-distribution set (precision/recall use it): put ImageNet "
                                "val first. Folders named by class index (0 ... 999), class "
                                "name or id (wnid); a set of fewer classes is scored over "
                                "their logits only. Default NAME: the folder's",
                                action="append", metavar="[NAME=]PATH")
    class_ids: str | None = flag(None, "the ids of the classes in label order, one a line "
                                 "(ImageNet: its wnids), for --val-dir sets in id folders; "
                                 "default: the sorted folders of a --val-dir set with one "
                                 "folder per class", metavar="FILE")
    ablate: list | None = flag(None, "turn parts of the method off (one --out per variant), "
                               "then compare precision and recall in results.json; with --epochs "
                               "0 only the synthetic set is made and measured", nargs="+",
                               choices=("guidance", "disambiguation", "content", "style"),
                               type=str, action="extend")


RUN, MODELS, PROMPTS = RunDefaults(), ModelDefaults(), PromptDefaults()
SAMPLING, DISTILL, MEASURE = SamplingDefaults(), DistillDefaults(), MeasureDefaults()


# ──────────────────────────────────────────────────────────────────────────────────────────
# An LLM's answers as whole phrases: what chat models write around them never reaches a prompt
# ──────────────────────────────────────────────────────────────────────────────────────────
# Words where a phrase begins (PHRASE_STARTS) and words a phrase cannot end on (DANGLING): a cut
# just before one of the first leaves whole phrases: "a small device | that is used to ...".
# Some prepositions end a phrase too: "seen from above".
PHRASE_STARTS = set("of in on at to for with by from into onto near next under over above below "
                    "between through during across against behind beside among inside outside "
                    "like as about along around without within and or but nor while when where "
                    "whose which that who used".split())
DANGLING = (PHRASE_STARTS - set("above below behind inside outside around along across about "
                                "without within".split())
            | set("a an the its their his her our your my this these is are was were be being "
                  "been has have can will very such".split()))
# What chat models write around an answer: preambles ("Sure! Here are 12 scenes:") and closing
# remarks ("These scenes capture ...", "Let me know ..."); also any sentence that ends in ':',
# '?' or '!' ("Great question!"), which no scene or description does.
CHAT_DEBRIS = re.compile(r"(?:sure|certainly|of course|absolutely|okay|(?:here|below)"
                         r"(?: are| is|'s)|these|this list|i hope|hope|i'm|i am|i've|let me"
                         r"|feel free|note|each of these|all of these|in summary|overall)\b",
                         re.IGNORECASE)
# The questions ask for 8 and 12 words; a phrase may run a little over. Prompts stay well
# within CLIP's 77 tokens: style, name, description and scene together.
PHRASE_WORDS = 14


def whole_phrase(text, max_words=PHRASE_WORDS):
    """`text`'s longest start of at most `max_words` words that ends a phrase: at its end or just
    before a word of PHRASE_STARTS or a dash, and never on a word of DANGLING ("the", "to",
    "used"); "" if there is none. A cut-off answer or a long sentence never ends mid-phrase."""
    words = text.split()
    for n in range(min(len(words), max_words), 0, -1):
        ends = n == len(words) or words[n].lower() in PHRASE_STARTS | {"-", "–", "—"}
        if ends and words[n - 1].lower().strip(",;") not in DANGLING:
            return " ".join(words[:n]).rstrip(",;")
    return ""


def clean_line(line):
    """One line of an LLM's answer as a bare phrase: its first sentence that is not chat debris
    (CHAT_DEBRIS), without list marker, markdown, double quotes and control characters, and
    without its heading ("**Office Desk**: a cluttered desk" keeps the text, a heading alone
    stays); "" for a markdown title ("### Outdoors") or when no sentence has a real word."""
    line = "".join(ch for ch in line if ch.isprintable()).replace("’", "'")
    if line.lstrip().startswith("#"):  # a markdown title of the lines that follow
        return ""
    line = re.sub(r"^\s*(?:[-*+]\s+|•\s*|\(?\d+[.)]\s+)", "", line)  # list marker
    line = re.sub(r"(\*\*|__)(.+?)\1\s*[-–—]\s+", r"\2: ", line)  # "**Heading** – text"
    line = re.sub(r"\*\*|__|[`\"“”]", "", line)
    for sentence in re.split(r"(?<=[A-Za-z]{3}[.!?])\s+", line):  # not after "St." or "e.g."
        head, _, text = sentence.partition(": ")
        text = (text or head).strip(" '‘.,;:!?-*")
        if (re.search(r"[A-Za-z]{3}", text) and not CHAT_DEBRIS.match(text)
                and not re.search(r"[:?!]\W*$", sentence)):
            # "On a desk" → "on a desk"; a proper noun is in neither set
            lower = text.split()[0].lower() in DANGLING | PHRASE_STARTS
            return text[0].lower() + text[1:] if lower else text
    return ""


def llm_description(answer, name):
    """What the LLM's `answer` says class `name` is, as a noun phrase: the phrase of its first
    line that has one (clean_line), without an opening that names the class ("A mouse is a
    small ..." → "a small ...", "Mouse - a ..."), cut to a whole phrase (whole_phrase); "" if
    none is left."""
    text = next(filter(None, map(clean_line, answer.splitlines())), "")
    subject = rf"(?:(?:a|an|the)\s+)?'?{re.escape(name)}(?:e?s)?'?|it|this"
    opening = rf"^(?:{subject})(?:,|\s+[-–—]|\s+(?:is|are|refers to|means)\b)\s*"
    return whole_phrase(re.sub(opening, "", text, flags=re.IGNORECASE))


# ──────────────────────────────────────────────────────────────────────────────────────────
# Errors: bad input is one line and exit code 2, a failed run one line and exit code 1
# ──────────────────────────────────────────────────────────────────────────────────────────
class UsageError(ValueError):
    """Bad input from the user, or damaged state in --out: main() prints it as one line on
    stderr and exits with code 2."""


class RunFailure(RuntimeError):
    """A run that cannot go on (training diverged): main() prints one line and exits with code 1."""


def first_line(error):
    """The first line of an exception's message, for one-line error reports."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def damaged(path, error, way_out):
    """The one-line UsageError for damaged state in --out: which file, what is wrong, the way out.
    """
    return UsageError(f"{path} is damaged ({first_line(error)}); {way_out}")


def cannot_load(what, name_or_path, error, alternative=""):
    """One line, under 300 characters, for a model that was found but cannot be loaded."""
    reason = first_line(error)
    reason = reason if len(reason) <= 120 else reason[:117] + "..."
    return (f"cannot load {what} {name_or_path} ({type(error).__name__}: {reason}); check that "
            f"the folder is complete" + (f", or use {alternative}" if alternative else ""))


def report(kind, message):
    """Prints `prism: <kind>: <message>` on stderr in one write, so that ranks do not interleave;
    under torchrun the rank is named (read from torchrun's variables: the group may be gone)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sys.stderr.write(f"prism: {kind}{f' (rank {rank})' if world > 1 else ''}: {message}\n")
    sys.stderr.flush()


def without_per_class(report):
    """`report` without its "per_class" lists (at any depth, in lists too): the summary that
    main() prints."""
    if isinstance(report, dict):
        return {key: without_per_class(value) for key,
                value in report.items() if key != "per_class"}
    if isinstance(report, list):
        return [without_per_class(value) for value in report]
    return report


# ──────────────────────────────────────────────────────────────────────────────────────────
# Files: atomic writes, strict JSON, readable images
# ──────────────────────────────────────────────────────────────────────────────────────────
def atomic_write(path, write):
    """Calls write(temp_path), forces the temp file to disk, then renames it onto `path`: a process
    killed at any moment (or a full disk) leaves the old file or the new one, never half of one.
    A failure to write (disk full, no permission) becomes a one-line UsageError."""
    path = Path(path)
    # the pid: ranks never share a temp file
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temp)
        descriptor = os.open(temp, os.O_RDONLY)
        try:  # without it, a machine that goes down right after the rename may keep an empty file
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {first_line(error)}")


def save_torch_atomic(obj, path):
    """torch.save(obj) to `path` atomically. Serialised in memory first, so that a full disk is an
    OSError of a plain file write (torch's own file writer reports it as a RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda temp: temp.write_bytes(buffer.getbuffer()))


def finite_or_none(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, at any depth: strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(value) for value in obj]
    return obj


def write_json_atomic(obj, path):
    """Writes `obj` as indented, strict JSON (no NaN or Infinity tokens) to `path` atomically."""
    text = json.dumps(finite_or_none(obj), indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def read_json(path, way_out):
    """The JSON object stored at `path`; a file that is not UTF-8, not JSON or not an object is
    damaged: a UsageError that names it and `way_out`."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(path, error, way_out)
    if not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__}, not an object", way_out)
    return data


def save_image_atomic(image, path, note=None):
    """Saves one image in [0, 1], (3, H, W), as 8-bit PNG or JPEG (by suffix) atomically, with
    the text `note` in its own metadata (read_note); returns its size in bytes. A non-finite
    image is refused: NaN pixels would be written as a black image."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if not torch.isfinite(image).all():
        raise ValueError(f"refusing to save non-finite pixels as {path}")
    pixels = image.detach().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(1, 2, 0).cpu().numpy()
    jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    png = PngInfo()
    if note is not None:
        png.add_text("prism", note)
    options = {"format": "JPEG", "quality": 95, "comment": note} if jpeg else {"format": "PNG",
                                                                               "pnginfo": png}
    atomic_write(path, lambda temp: Image.fromarray(pixels).save(temp, **options))
    return Path(path).stat().st_size


def read_note(path):
    """The text save_image_atomic put in an image's metadata, or None: none there, or the image
    does not decode whole."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            note = image.info.get("prism", image.info.get("comment"))
        return note.decode("utf-8") if isinstance(note, bytes) else note
    except Exception:  # whatever PIL says, this is no image of ours
        return None


def check_images_load(data_dir, what, checked=()):
    """Decodes every image of the ImageFolder tree `data_dir` (the ranks share the work); the
    first one that does not load is a UsageError naming the file. Returns (the number of images,
    each rank's stamp of the tree: every file's name, size and modification time). A tree whose
    stamps are all in `checked` was decoded whole before and is not again: a resumed run starts
    in seconds."""
    from PIL import Image

    rank, world = rank_and_world()
    try:
        samples = image_folder(data_dir, None).samples
    except UsageError as error:
        raise UsageError(f"{what}: {error}")
    listing = [(path, status.st_size, status.st_mtime_ns)
               for path, status in ((path, os.stat(path)) for path, _ in samples)]
    # every rank's stamp (a node may hold its own copy): all skip the decode, or none does
    stamps = [stamp for [stamp] in gather_from_ranks(
        [hashlib.sha256(json.dumps(listing).encode()).hexdigest()])]
    if all(stamp in checked for stamp in stamps):
        return len(samples), stamps
    paths = [path for path, _ in samples][rank::world]
    problem = ""
    for path in tqdm(paths, desc=f"checking {what}", unit="img",
                     disable=rank != 0 or len(paths) < 1000):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # whatever PIL says, the file is not a usable image
            problem = (f"{what}: {path} is not a readable image ({first_line(error)}); fix or "
                       f"remove it")
            break
    problem = next((p for [p] in gather_from_ranks([problem]) if p), "")
    if problem:
        raise UsageError(problem)
    return len(samples), stamps


TEMP_FILE = re.compile(r"^\..+\.tmp\d+$")  # atomic_write's temp files: .<name>.tmp<pid>


def remove_stale_temps(out):
    """Deletes the temp files of atomic writes that a killed run left in the folders prism writes
    under `out` (--out, synthetic/ and benchmark/ with their class folders), and only files of
    atomic_write's naming pattern: never a user's file. Call it holding the lock."""
    out = Path(out)
    folders = [out, out / "synthetic", out / "benchmark", out / "benchmark" / "images"]
    folders += [f for parent in (out / "synthetic", out / "benchmark" / "images") if parent.is_dir()
                for f in parent.iterdir() if f.name.isdigit() and f.is_dir() and not f.is_symlink()]
    for folder in folders:
        for path in folder.glob(".*.tmp*") if folder.is_dir() else []:
            if TEMP_FILE.match(path.name):
                path.unlink(missing_ok=True)


# ──────────────────────────────────────────────────────────────────────────────────────────
# Resume: settings, manifest journals, checkpoints (nothing cached is lost or mixed)
# ──────────────────────────────────────────────────────────────────────────────────────────
def file_fingerprint(path):
    """First 16 hex digits of a file's SHA-256: a model file changed under the same name is another
    model."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def settings_difference(old, new, shown=3):
    """A short text of the keys whose values differ between two settings dicts ('' if none):
    the first `shown` of them, then how many more."""
    keys = [k for k in sorted(set(old) | set(new), key=str) if old.get(k) != new.get(k)]
    text = ", ".join(f"{k}: {str(old.get(k))[:40]} -> {str(new.get(k))[:40]}" for k in keys[:shown])
    return text + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def check_settings(path, settings, *, overwrite, what):
    """Compares `settings` with those recorded at `path` (JSON). Returns True if they match,
    False if none are recorded, and raises UsageError on a difference or a damaged file unless
    `overwrite`."""
    # compare as stored: tuples become lists
    path, settings = Path(path), json.loads(json.dumps(settings))
    if not path.exists():
        return False
    way_out = f"rerun with --overwrite to remake the {what} (what is still valid is kept)"
    try:
        recorded = read_json(path, way_out).get("settings")
        if not isinstance(recorded, dict):
            raise damaged(path, "no settings in it", way_out)
    except UsageError:
        if overwrite:
            return False
        raise
    if recorded == settings:
        return True
    if overwrite:
        return False
    raise UsageError(f"{path.parent} holds {what} made under other settings "
                     f"({settings_difference(recorded, settings)}); use another --out, or "
                     f"--overwrite to replace them")


def synthesis_settings(prompts, *, per_class, seed, image_format, identity, sample_kwargs,
                       store_size=None):
    """Everything that decides the pixels of the cached images (not the batch size, which does not).
    """
    prompts_hash = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {"per_class": per_class, "seed": seed, "image_format": image_format,
            "prompts_sha256": prompts_hash,
            "store_size": store_size, **identity, **sample_kwargs}


def settings_digest(settings):
    """16 hex digits naming a settings dict; every manifest record carries the digest of the
    settings its image was made under, so an image can be trusted without settings.json."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def start_new_set(out_dir, settings):
    """Records new synthesis settings in `out_dir` (rank 0; the recorded ones differ or are
    damaged, and --overwrite was given). Images whose record (in the manifest, else in the image)
    carries these settings' digest are kept; the rest of the old set is deleted. Killed half way,
    it leaves the old settings (the next run refuses again) or the new ones with only images made
    under them."""
    digest, manifest_path = settings_digest(settings), out_dir / "manifest.jsonl"
    records = read_manifest(out_dir).values()
    keep = {r["file"]: r for r in records if r.get("settings") == digest}
    recorded = {r["file"] for r in records}  # the others are read (decoded) one by one
    kept = "".join(json.dumps(record) + "\n" for record in keep.values())
    atomic_write(manifest_path, lambda temp: temp.write_text(kept, encoding="utf-8"))
    for journal in out_dir.glob("manifest.rank*.jsonl"):
        journal.unlink()
    for folder in [p for p in out_dir.iterdir() if p.is_dir() and p.name.isdigit()]:
        for image in folder.iterdir():
            name = f"{folder.name}/{image.name}"
            if name not in keep and (name in recorded
                                     or image_record(image).get("settings") != digest):
                image.unlink()
    write_json_atomic({"settings": settings}, out_dir / "settings.json")


def open_image_set(out_dir, settings, num_classes, *, overwrite):
    """Makes `out_dir` ready for images made under `settings`: created, holding no folder that is
    not a class of the set (distillation would read it as one), and its settings.json the same
    or, with `overwrite`, a new set started (start_new_set keeps the images whose record carries
    the new settings' digest). Other or damaged settings without it: a UsageError."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create {out_dir}: {first_line(error)}")
    expected = {class_folder(c, num_classes) for c in range(num_classes)}
    stray = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and p.name not in expected)
    if stray:
        raise UsageError(f"{out_dir} holds folders that are not classes of this set "
                         f"({', '.join(stray[:3])}): move them out of it")
    same = check_settings(out_dir / "settings.json", settings, overwrite=overwrite,
                          what="synthetic images")
    barrier()  # every rank has read the old settings before rank 0 may replace them
    if rank_and_world()[0] == 0 and not same:
        start_new_set(out_dir, settings)
    barrier()


def file_size(path):
    """The size of a file in bytes, None if there is none (a folder has none)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def images_to_make(out_dir, file_of, num_classes, per_class, max_new_images, digest):
    """(wanted, missing): every (class, index) of the set, and those without an image (at most
    `max_new_images`), the same list on every rank; each rank checks a share of the files.

    An image is there when its file has the size its manifest record gives: files are written
    whole (atomic_write), so a stat per image suffices and a resumed run starts in seconds. An
    image without an intact record keeps its own (in its metadata, saved under the settings of
    `digest`): it is read again from there, journaled and said, never made again. A folder where
    an image belongs is refused."""
    rank, world = rank_and_world()
    records = read_manifest(out_dir)
    wanted = [(c, i) for c in range(num_classes) for i in range(per_class)]
    mine, found = [], []
    for key in wanted[rank::world]:
        path = out_dir / file_of(*key)
        size = file_size(path)
        if size is not None and size == records.get(key, {}).get("bytes"):
            continue
        record = image_record(path) if size else {}
        ours = [record.get(k) for k in ("file", "class", "index", "settings")]
        if valid_record(record) and ours == [file_of(*key), *key, digest]:
            found.append(record)
        else:
            mine.append(key)
    if found:
        append_to_journal(out_dir / f"manifest.rank{rank}.jsonl", found)
    blocked = [out_dir / file_of(*key) for key in mine if (out_dir / file_of(*key)).is_dir()]
    if blocked:
        raise UsageError(f"{blocked[0]} is a folder where an image belongs: remove it and rerun")
    parts = gather_from_ranks([mine, len(found)])
    lost = sum(count for _, count in parts)
    if lost and rank == 0:
        report("warning", f"{out_dir / 'manifest.jsonl'} had no intact record of {lost} images "
                          f"on disk; each was read again from the image's own metadata, and "
                          f"none is made again")
    missing = sorted(tuple(key) for part, _ in parts for key in part)
    return wanted, missing if max_new_images is None else missing[:max_new_images]


def save_generated(image, out_dir, file, c, i, prompt, noise_seed, stats, digest):
    """Writes one generated image atomically and returns its manifest record: file, class, index,
    prompt, seed, the teacher's final energy, top-1 and p_class, the guidance steps skipped,
    whether it was made again unguided, its bytes and the digest of its set's settings."""
    (out_dir / file).parent.mkdir(exist_ok=True)
    record = {"file": file, "class": c, "index": i, "prompt": prompt, "seed": noise_seed,
              "energy": round(stats["energy"].item(), 5), "top1": stats["top1"].item(),
              "p_class": round(stats["p_class"].item(), 6),
              "guidance_skipped": stats["guidance_skipped"].item(),
              "resampled_unguided": bool(stats["resampled_unguided"]), "bytes": None,
              "settings": digest}
    # the image keeps its own record (all but its size), so a lost manifest line costs nothing
    note = json.dumps(finite_or_none(record), allow_nan=False)
    record["bytes"] = save_image_atomic(image, out_dir / file, note)
    return record


def image_record(path):
    """The manifest record an image keeps in its own metadata (save_generated), with its size;
    {} when it has none or does not decode whole."""
    try:
        record = json.loads(read_note(path) or "{}")
    except ValueError:
        return {}
    return {**record, "bytes": file_size(path)} if isinstance(record, dict) and record else {}


def merge_journals(out_dir, wanted):
    """Once every rank is done, rank 0 merges the ranks' journals into manifest.jsonl (rewritten
    only when it changes) and deletes them. Returns the records of `wanted`, in its order."""
    barrier()  # every rank's journal is complete
    if rank_and_world()[0] == 0:
        records = read_manifest(out_dir)
        compacted = "".join(json.dumps(records[key]) + "\n" for key in wanted if key in records)
        manifest = out_dir / "manifest.jsonl"
        if not manifest.exists() or manifest.read_bytes() != compacted.encode("utf-8"):
            atomic_write(manifest, lambda temp: temp.write_text(compacted, encoding="utf-8"))
        for journal in out_dir.glob("manifest.rank*.jsonl"):
            journal.unlink()
    barrier()
    records = read_manifest(out_dir)
    return [records[key] for key in wanted if key in records]


def valid_record(record):
    """True if a manifest record has its keys with values of the right kind (finite numbers)."""
    def number(x):
        return x is None or (isinstance(x, (int, float)) and math.isfinite(x))
    integers = ("class", "index", "bytes")
    return (isinstance(record, dict) and all(isinstance(record.get(k), int) for k in integers)
            and isinstance(record.get("file"), str) and number(record.get("energy"))
            and number(record.get("p_class")) and isinstance(record.get("top1"), int))


def read_manifest(folder):
    """Records of a synthetic set keyed by (class, index): manifest.jsonl, then the journals of the
    ranks (manifest.rank<r>.jsonl) of an unfinished run. Later lines win; a damaged line (torn,
    not UTF-8, not JSON) is ignored, so its image is checked and made again."""
    records = {}
    for path in [Path(folder) / "manifest.jsonl",
                 *sorted(Path(folder).glob("manifest.rank*.jsonl"))]:
        if not path.exists():
            continue
        for line in path.read_bytes().splitlines():
            # a damaged line (torn by a kill, a bad byte) loses one record: that image is remade
            try:
                record = json.loads(line.decode("utf-8"))
                if valid_record(record):
                    records[(record["class"], record["index"])] = record
            except ValueError:
                continue
    return records


def append_to_journal(path, records):
    """Appends `records` as JSON lines to the journal at `path` and forces them to disk, so a crash
    loses at most the records of the batch being written (their images are then made again)."""
    text = "".join(json.dumps(finite_or_none(record), allow_nan=False) + "\n" for record in records)
    try:
        with open(path, "ab+") as journal:
            if journal.seek(0, os.SEEK_END) > 0:
                journal.seek(-1, os.SEEK_END)
                if journal.read(1) != b"\n":  # a run killed mid-line: start on a line of our own
                    text = "\n" + text
            journal.write(text.encode("utf-8"))
            journal.flush()
            os.fsync(journal.fileno())
    except OSError as error:
        raise UsageError(f"cannot write {path}: {first_line(error)}")


CHECKPOINT_KEYS = ("epoch", "config", "history", "student", "optimizer", "schedule")


def tensor_shapes(state):
    """{name: shape} of a state dict: what a checkpoint must match to load into a model."""
    return {name: tuple(value.shape) for name, value in state.items()}


def load_checkpoint(path, device, student, *, overwrite=False):
    """distill's checkpoint at `path`, or None if there is none. One that does not load (empty,
    truncated, garbage, another kind of file, or weights that do not fit `student`) is damaged:
    a UsageError naming it, or None (start again) with `overwrite`."""
    if not Path(path).exists():
        return None
    try:
        # a damaged file is said in one line, without torch's warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(checkpoint,
                          dict) or not all(key in checkpoint for key in CHECKPOINT_KEYS):
            raise ValueError("not a PRISM distillation checkpoint")
        if tensor_shapes(checkpoint["student"]) != tensor_shapes(student.state_dict()):
            raise ValueError("its weights do not fit this student")
        if not all(torch.isfinite(t).all() for t in checkpoint["student"].values()
                   if t.is_floating_point()):
            raise ValueError("its student weights are not finite")
        if not (isinstance(checkpoint["epoch"], int) and isinstance(checkpoint["history"], list)
                and len(checkpoint["history"]) == checkpoint["epoch"]):
            raise ValueError("its epoch count and loss history disagree")
        return checkpoint
    except Exception as error:  # any failure to load it means: damaged
        if overwrite:
            return None
        if "weights_only" in str(error):  # torch's advice to unpickle anything does not apply here
            error = "it holds objects other than tensors"
        raise damaged(path, error, "rerun with --overwrite to restart distillation (the synthetic "
                                   "images are kept), or delete it")


def distill_resumable(teacher, student, data_dir, checkpoint_path, *, overwrite=False,
                      data_settings=None, epochs_this_run=None, **options):
    """distill() with its state in `checkpoint_path` after every epoch (rank 0 writes it
    atomically), resumed from there by the next call. A checkpoint made under other options or
    data (`data_settings`) is a UsageError, or with `overwrite` training starts again. At the end
    every rank takes rank 0's weights (BatchNorm statistics drift apart on the ranks)."""
    config = {key: value for key, value in {**KD, **options, "data": data_settings}.items()
              if key not in ("device", "num_workers", "progress", "channels_last", "resume",
                             "stop_after", "on_epoch")}
    checkpoint = load_checkpoint(checkpoint_path, options.get("device", "cpu"), student,
                                 overwrite=overwrite)
    if checkpoint is not None and checkpoint["config"] != config:
        if not overwrite:
            raise UsageError(f"{checkpoint_path} was made under other settings "
                             f"({settings_difference(checkpoint['config'], config)}); use "
                             f"--overwrite to restart")
        checkpoint = None
    barrier()  # no rank may still be reading the checkpoint when rank 0 replaces it

    def save(state):
        if rank_and_world()[0] == 0:
            save_torch_atomic({**state, "config": config}, Path(checkpoint_path))
    history = distill(teacher, student, data_dir, resume=checkpoint, stop_after=epochs_this_run,
                      on_epoch=save, **options)
    broadcast_from_rank_zero(student)
    return history


# ──────────────────────────────────────────────────────────────────────────────────────────
# Labelled image folders: which folder is which class
# ──────────────────────────────────────────────────────────────────────────────────────────
def image_folder(data_dir, transform, classes=None):
    """torchvision ImageFolder of `data_dir` (a UsageError if unusable) whose targets are the
    position of each image's folder among the sorted folders or, with `classes` (class_mapping's
    class of each), its class: folders 0 … 999 are classes 0 … 999, not the order 0, 1, 10, …"""
    try:
        dataset = torchvision.datasets.ImageFolder(
            str(data_dir), transform=transform,
            target_transform=None if classes is None else list(classes).__getitem__)
    except (FileNotFoundError, NotADirectoryError) as error:  # it names the empty folders
        raise UsageError(f"cannot read images from {data_dir}: {first_line(error)[:200]}")
    return dataset


def named_val_sets(values):
    """(name, path) of each --val-dir value, `NAME=PATH` or `PATH` (named by its folder), in the
    order given: the first is the in-distribution set."""
    sets = []
    for value in values or []:
        name, equals, path = value.partition("=")
        if not equals or os.sep in name:  # no name given, or a "=" inside the path itself
            name, path = Path(os.path.abspath(value)).name, value
        if not (name.strip() and path.strip()) or name in dict(sets):
            raise UsageError(f"--val-dir {value}: give each set a folder and a name of its own "
                             f"(NAME=PATH)")
        sets.append((name, Path(path)))
    return sets


def read_lines(path, flag, count=None):
    """The non-blank lines of the UTF-8 text file `path` (from `flag`), one item a line in label
    order, each split at its first tab into stripped cells; unreadable, empty, an item (its first
    cell) blank or twice (in any case), or not `count` items: a UsageError naming the file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path} cannot be read ({first_line(error)}): give a UTF-8 "
                         f"text file, one class a line")
    rows = [[cell.strip() for cell in line.split("\t", 1)] for line in text.splitlines()
            if line.strip()]
    keys = sorted(row[0].lower() for row in rows)
    twice = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
    problem = ("is empty" if not rows else "has a line with no name before its tab" if not keys[0]
               else f"gives '{twice}' twice" if twice is not None
               else f"has {len(rows)} lines but the teacher has {count} classes"
               if count not in (None, len(rows)) else "")
    if problem:
        raise UsageError(f"{flag} {path} {problem}: give one class a line, in label order")
    return rows


def class_mapping(folders, num_classes, class_names, reference_ids=None, reference="reference"):
    """(classes, rule): the teacher class of each of a labelled set's sorted class `folders`, by
    the first rule that maps them all: 1. every name an integer (ImageNet-V2's 0 … 999) →
    int(name); 2. a class name (any case) → its index; 3. an id of `reference_ids` (label order;
    `reference` says whence) → its position there; 4. num_classes folders, all WordNet ids, no
    --class-ids → their sorted order (ImageNet val). Else, or a class out of range, an ambiguous
    name, two folders of one class: a UsageError naming the folder (never a wrong score)."""
    by_name, position = {}, {id_: n for n, id_ in enumerate(reference_ids or [])}
    for index, name in enumerate(class_names):
        by_name.setdefault(name.lower(), []).append(index)
    if not folders:
        raise UsageError("has no class folders")
    if all(re.fullmatch(r"[0-9]+", f) for f in folders):
        classes, rule = [int(f) for f in folders], "integer folder names"
    elif all(f.lower() in by_name for f in folders):
        classes, rule = [by_name[f.lower()][0] for f in folders], "class names"
        twice = next((f for f in folders if len(by_name[f.lower()]) > 1), None)
        if twice:
            raise UsageError(f"folder '{twice}' names classes {by_name[twice.lower()]} of the "
                             f"class list: name the folders by class index")
    elif position and all(f in position for f in folders):
        classes, rule = [position[f] for f in folders], f"ids via {reference}"
    elif (len(folders) == num_classes and all(re.fullmatch(r"[a-z][0-9]{8}", f) for f in folders)
          and not (reference or "").startswith("--class-ids")):
        order = {f: n for n, f in enumerate(sorted(folders))}
        classes, rule = [order[f] for f in folders], "sorted folder names"
    else:
        lost = next((f for f in folders if not (re.fullmatch(r"[0-9]+", f) or f in position
                                                or f.lower() in by_name)), folders[0])
        raise UsageError(f"folder '{lost}' maps to no class (no rule of class_mapping fits); "
                         f"give --class-ids FILE (one id a line, in label order), or the full set "
                         f"(ImageNet val) as another --val-dir, or name the folders by class index")
    for n, (folder, c) in enumerate(zip(folders, classes)):
        if c >= num_classes:
            raise UsageError(f"folder '{folder}' is class {c}, but the teacher's classes are "
                             f"0 to {num_classes - 1}")
        if c in classes[:n]:
            raise UsageError(f"folders '{folders[classes.index(c)]}' and '{folder}' are both "
                             f"class {c}")
    return classes, rule


def labelled_sets(named_sets, class_names, class_ids=None, checked_file=None):
    """Each (name, path) of named_sets as a dict: name, data, folders (sorted), classes and
    mapping (class_mapping's), images (their count): all mapped and decoded now, so a bad set is
    refused before any work. Rule 3's ids: `class_ids` ((path, ids)), else the sorted folders of
    the first set rule 4 maps. `checked_file` caches the stamps of trees decoded whole (a damaged
    cache: decoded again)."""
    sets = []
    for name, path in named_sets:
        if not Path(path).is_dir():
            raise UsageError(f"--val-dir {name}: {path} is not a directory of class folders")
        sets.append({"name": name, "data": str(path),
                     "folders": sorted(e.name for e in os.scandir(path) if e.is_dir())})
    reference_ids, reference = (None, None) if class_ids is None else (
        class_ids[1], f"--class-ids {class_ids[0]}")
    for s in sets if class_ids is None else []:
        try:  # a set that no rule maps is no reference; its own mapping says why, naming it
            rule = class_mapping(s["folders"], len(class_names), class_names)[1]
        except UsageError:
            continue
        if rule == "sorted folder names":
            reference_ids, reference = sorted(s["folders"]), f"sorted folders of set {s['name']}"
            break
    for s in sets:
        try:
            s["classes"], s["mapping"] = class_mapping(s["folders"], len(class_names), class_names,
                                                       reference_ids, reference)
        except UsageError as error:
            raise UsageError(f"--val-dir {s['name']} ({s['data']}): {error}")
    try:
        checked = set(json.loads(Path(checked_file).read_bytes().decode("utf-8"))["stamps"])
    except (TypeError, OSError, ValueError, KeyError):  # none, or damaged: one more decode
        checked = set()
    stamps = set(checked)
    for s in sets:
        s["images"], seen = check_images_load(s["data"], f"--val-dir {s['name']}", stamps)
        stamps.update(seen)
    if checked_file and stamps != checked and rank_and_world()[0] == 0:
        write_json_atomic({"stamps": sorted(stamps)}, checked_file)
    return sets


# ──────────────────────────────────────────────────────────────────────────────────────────
# Several processes (torchrun) and devices
# ──────────────────────────────────────────────────────────────────────────────────────────
# `torchrun --nproc_per_node=N prism.py ...` starts N copies of this program; init_distributed
# joins them into one process group. Without one (`python prism.py`) these helpers are those of
# rank 0 of 1: every function runs unchanged in one process.
def rank_and_world():
    """(rank, world size) of this process in the torch.distributed group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


BARRIERS = itertools.count(1)  # every rank passes the same barriers in the same order


def barrier():
    """Waits until every rank has reached this point, however long that takes. Ranks hours apart
    must not meet the collective timeout, whose watchdog would abort the job: each rank counts
    itself in at a key of the group's store and polls it, no collective pending. A rank that
    dies ends the job through torchrun."""
    world = rank_and_world()[1]
    if world == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    # a key per barrier and per torchrun restart (the agent's store outlives a restart)
    key = f"prism/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/barrier/{next(BARRIERS)}"
    store.add(key, 1)
    delay = 0.01
    while store.add(key, 0) < world:
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def gather_from_ranks(items):
    """[items of rank 0, items of rank 1, ...] (Python lists) on every rank, after a barrier()."""
    world = rank_and_world()[1]
    if world == 1:
        return [list(items)]
    barrier()
    parts = [None] * world
    dist.all_gather_object(parts, list(items))
    return parts


def sum_over_ranks(numbers):
    """Element-wise sum over the ranks of a list of Python numbers, on every rank."""
    return [sum(column) for column in zip(*gather_from_ranks(numbers))]


def on_rank_zero(work):
    """Runs work() on rank 0 alone, the others waiting, and raises its error on every rank (a
    UsageError as one, any other as a RunFailure), so that no rank waits for one that failed."""
    error = None
    if rank_and_world()[0] == 0:
        try:
            work()
        except Exception as caught:  # raised below, on every rank
            error = caught
    shared = gather_from_ranks([error and [isinstance(error, UsageError), str(error)]])[0][0]
    if shared is not None:
        raise error or (UsageError if shared[0] else RunFailure)(shared[1])


def broadcast_from_rank_zero(module):
    """Copies rank 0's parameters and buffers into `module` on every rank."""
    if rank_and_world()[1] > 1:
        barrier()  # rank 0 may still be writing its checkpoint
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def process_gpu(local_rank, visible_gpus):
    """The CUDA index of process LOCAL_RANK `local_rank` seeing `visible_gpus` GPUs: its own, or
    0 when a launcher gave each process one (CUDA_VISIBLE_DEVICES: it sees exactly one)."""
    if visible_gpus != 1 and local_rank >= visible_gpus:
        raise UsageError(f"process {local_rank} of this node has no GPU of its own ({visible_gpus} "
                         f"visible): use --nproc_per_node <= the GPU count")
    return 0 if visible_gpus == 1 else local_rank


def init_distributed(device_name, timeout=timedelta(minutes=30)):
    """This process's torch device for --device ("auto": CUDA when there is one). Under torchrun
    (WORLD_SIZE > 1) it joins the process group first: NCCL with one GPU per process
    (process_gpu), or gloo on the CPU. `timeout` bounds a collective that every rank is in (a
    hung GPU); waits for other ranks' work go through barrier(), which has no bound."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError as error:
        raise UsageError(f"bad --device '{device_name}': {first_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device_name}: no CUDA GPU is available here")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", process_gpu(int(os.environ.get("LOCAL_RANK", "0")),
                                                  torch.cuda.device_count()))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return device


def usable_cores():
    """The CPU cores this process may use (its affinity, where the system tells it)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1)


# A loader process reads, decodes and augments about 500 cached images a second (320² PNG, one
# CPU core, measured): 12 feed about 6,000 images/s, more than a resnet50 → resnet18 KD step
# takes on one GPU. More only add memory (each holds prefetched batches) and start-up time.
MAX_WORKERS = 12


def default_workers():
    """Data-loading processes per torchrun process: the CPU cores this process may use, shared by
    the processes of its node, less one for the training process (0 to MAX_WORKERS)."""
    cores = usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(MAX_WORKERS, max(0, cores - 1))


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
    """One run at a time per --out: rank 0 creates it and holds an exclusive flock on
    OUT/.prism.lock for the run (its other ranks share it), and, holding it, removes stale temp
    files. A second run is refused in one line. The lock dies with its holder, even on SIGKILL."""
    handle, problem = None, ""
    if rank_and_world()[0] == 0:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            handle = open(Path(out) / ".prism.lock", "a")
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_stale_temps(out)
        except BlockingIOError:
            problem = (f"{out} is in use by another prism run; wait for it to end, or use "
                       f"another --out")
        except OSError as error:
            problem = f"cannot use --out {out}: {first_line(error)}"
    problem = gather_from_ranks([problem])[0][0]  # every rank learns rank 0's verdict
    try:
        if problem:
            raise UsageError(problem)
        yield
    finally:
        if handle is not None:
            handle.close()


# ──────────────────────────────────────────────────────────────────────────────────────────
# Model loading: a hub id or a local folder, or one line that says what to do
# ──────────────────────────────────────────────────────────────────────────────────────────
def locate_model(name_or_path, flag, alternative=""):
    """Where from_pretrained finds `name_or_path`: (source, local_files_only). A local folder as
    it is; a hub id from the hub when it answers (one request, 10 s at most), else from the
    Hugging Face cache. Neither: a UsageError naming `flag` and the ways out, at once rather
    than after the libraries' minute of retries."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    if Path(name_or_path).is_dir():
        return str(name_or_path), True
    name, tail = str(name_or_path), f"; or use {alternative}" if alternative else ""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UsageError(f"{flag} {name}: no such folder{tail}")
    try:
        info = None if constants.HF_HUB_OFFLINE else huggingface_hub.model_info(name, timeout=10)
    except (errors.RepositoryNotFoundError, errors.HFValidationError):
        raise UsageError(f"{flag} {name}: no such model on the hub and no such folder{tail}")
    except Exception:  # the hub cannot be reached: the cache may still hold the model
        info = None
    if info is not None and info.gated and not huggingface_hub.get_token():
        raise UsageError(f"{flag} {name}: accept its licence on huggingface.co, then "
                         f"`hf auth login`{tail}")
    if info is not None:
        return name, False
    try:
        huggingface_hub.snapshot_download(name, local_files_only=True)
        return name, True
    except Exception:
        raise UsageError(f"{flag} {name}: not in the local cache and the hub is "
                         f"{'off (HF_HUB_OFFLINE)' if constants.HF_HUB_OFFLINE else 'unreachable'}"
                         f"; download it (`hf download {name}`) and pass its folder{tail}")


def load_pretrained(name_or_path, flag, what, load, alternative=""):
    """load(source, local_files_only) of the model that locate_model finds for `flag`; one that
    is found but does not load is a UsageError too (cannot_load)."""
    source, local_only = locate_model(name_or_path, flag, alternative)
    try:
        return load(source, local_only)
    except Exception as error:  # format failures all mean "cannot use this model"
        raise UsageError(cannot_load(what, name_or_path, error, alternative))


def known_classifier(name, role):
    """`name` if torchvision has a classifier of that name (resnet50, ...), else a UsageError."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UsageError(f"unknown {role} '{name}': give a torchvision classifier name (e.g. "
                         f"resnet50){' or a TorchScript file' if role == 'teacher' else ''}")
    return name


def load_teacher(name_or_path, device, *, weights_path=None, num_classes=1000,
                 input_size=MODELS.teacher_input_size,
                 mean=MODELS.teacher_mean, std=MODELS.teacher_std):
    """(teacher, class names or None): the frozen f_T (eval, requires_grad_(False)), taking [0, 1]
    images of any size, from a torchvision name (weights DEFAULT, or the state dict
    `weights_path` of `num_classes` outputs; the DEFAULT transforms give sizes, mean and std, its
    metadata the names) or a TorchScript file (`input_size`, `mean`, `std` describe it)."""
    class_names, resize_size = None, None
    if os.path.isfile(name_or_path):
        try:
            with warnings.catch_warnings():  # TorchScript works; its deprecation notice is not news
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(name_or_path, map_location="cpu")
        except Exception as error:  # any failure here means the file is not a TorchScript model
            raise UsageError(f"teacher file {name_or_path} is not a TorchScript model: "
                             f"{first_line(error)}")
    else:  # preprocessed and evaluated as its weights define it (resnet50's V2: resize 232)
        weights = torchvision.models.get_model_weights(known_classifier(name_or_path,
                                                                        "teacher")).DEFAULT
        preset = weights.transforms()
        input_size, resize_size = preset.crop_size[0], preset.resize_size[0]
        mean, std = preset.mean, preset.std
        try:
            if weights_path is None:
                model = torchvision.models.get_model(name_or_path, weights=weights)
                class_names = list(weights.meta["categories"])
            else:
                model = torchvision.models.get_model(name_or_path, num_classes=num_classes)
                model.load_state_dict(torch.load(weights_path, map_location="cpu",
                                                 weights_only=True))
        except Exception as error:  # a download or a state dict that fails: say which, offline
            raise UsageError(f"cannot load the {name_or_path} teacher's weights "
                             f"{weights_path or weights} ({first_line(error)}); offline, put "
                             f"them in {torch.hub.get_dir()}/checkpoints or pass "
                             f"--teacher-weights PATH")
    teacher = with_preprocessing(model, input_size, mean, std, resize_size)
    return teacher.to(device).eval().requires_grad_(False), class_names


def build_student(name, num_classes, *, input_size=DISTILL.image_size, mean=MODELS.teacher_mean,
                  std=MODELS.teacher_std):
    """A randomly initialised torchvision classifier `name` with `num_classes` outputs, taking
    [0, 1] images like the teacher (same normalisation, its own input size)."""
    model = torchvision.models.get_model(known_classifier(name, "student"), weights=None,
                                         num_classes=num_classes)
    return with_preprocessing(model, input_size, mean, std)


def load_class_names(data):
    """(class_names, descriptions or None): for "imagenet" the 1000 names of torchvision's
    metadata (no download), else the --data file's lines (read_lines), `name[<TAB>description]`
    in label order; the descriptions are the best disambiguation context (§3)."""
    if data == "imagenet":
        return list(torchvision.models.ResNet50_Weights.DEFAULT.meta["categories"]), None
    rows = read_lines(data, "--data")
    descriptions = [row[1] if len(row) > 1 else "" for row in rows]
    return [row[0] for row in rows], descriptions if any(descriptions) else None


def load_llm(name_or_path, device):
    """An instruction-tuned causal LM (hub id or local folder) as (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = "auto" if torch.device(device).type == "cuda" else torch.float32
    tokenizer, model = load_pretrained(name_or_path, "--llm", "LLM", lambda source, local: (
        AutoTokenizer.from_pretrained(source, local_files_only=local),
        AutoModelForCausalLM.from_pretrained(source, local_files_only=local, dtype=dtype)),
        "--llm none")
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def load_diffusion_pipeline(name_or_path, device, dtype=torch.float32):
    """A frozen diffusers StableDiffusionPipeline (hub id or local folder) on `device`, without
    the safety checker (our choice): it blacks out whole images, which would enter the transfer
    set as labelled black squares."""
    from diffusers import StableDiffusionPipeline

    # low_cpu_mem_usage=False is what diffusers does without `accelerate` anyway (it loads lazily
    # from the safetensors files, measured: no slower, no more memory); said, it does not warn
    pipe = load_pretrained(name_or_path, "--sd-model", "diffusion model", lambda source, local:
                           StableDiffusionPipeline.from_pretrained(
                               source, dtype=dtype, safety_checker=None, local_files_only=local,
                               requires_safety_checker=False, low_cpu_mem_usage=False))
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_guidance_vae(name_or_path, device, dtype=torch.float32):
    """A frozen diffusers AutoencoderTiny (TAESD, e.g. madebyollin/taesd for SD 1.x) for the
    guidance decode only: its decoder costs a few percent of SD's."""
    from diffusers import AutoencoderTiny

    vae = load_pretrained(name_or_path, "--guidance-vae", "tiny autoencoder", lambda source, local:
                          AutoencoderTiny.from_pretrained(source, dtype=dtype,
                                                          local_files_only=local))
    return vae.requires_grad_(False).eval().to(device)


def speed_up_pipeline(pipe, *, channels_last=False, compile_unet=False):
    """`pipe` with speed options that leave the images within rounding (tested): channels_last
    for the UNet and VAE convolutions (faster with fp16 on GPUs), torch.compile of the UNet."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


# ──────────────────────────────────────────────────────────────────────────────────────────
# The command line: every flag, checked as it is read
# ──────────────────────────────────────────────────────────────────────────────────────────
class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line naming it, exit 2)."""

    def error(self, message):
        raise UsageError(message.removeprefix("argument "))


SMOKE_DEFAULTS = dict(per_class=4, steps=10, height=32, width=32, gen_batch=8, epochs=2,
                      batch_size=8, image_size=32, workers=0, lr=0.05, guidance_start=0.0,
                      guidance_end=1.0, guidance_every=1)


BENCHMARK_CPU_DEFAULTS = dict(height=128, width=128, steps=10, gen_batch=1, batch_size=8,
                              workers=min(2, usable_cores()))


@dataclasses.dataclass(frozen=True)
class CommandLineOptions:
    """modes and reruns"""
    smoke: bool = flag(False, "offline plumbing check: tiny random models, a CPU, minutes; "
                       "ignores --teacher/--student/--data/--sd-model, and --llm but for none "
                       "(no accuracy meaning)", action="store_true")
    benchmark: bool = flag(False, "time synthesis (each guidance mode) and distillation with SD "
                           "1.5 / resnet50 / resnet18 architectures and random weights, no "
                           "download; writes OUT/benchmark.md and .json. Uses --height --width "
                           "--steps --gen-batch --batch-size --image-size --workers "
                           "--channels-last --compile; on a CPU their defaults shrink to a few "
                           "minutes' work", action="store_true")
    check_guidance: bool = flag(False, "measure energy guidance on these weights (minutes): "
                                "cosine of each gradient mode with the method's, effect on "
                                "energy, p(y) and top-1 vs unguided from the same noise, s/img; "
                                "writes OUT/check_guidance.md and .json", action="store_true")
    check_classes: int = flag(4, "classes (spread evenly) for --check-guidance")
    check_seeds: int = flag(2, "images per class for --check-guidance")
    overwrite: bool = flag(False, "replace data in --out made under other settings or damaged "
                           "(what is still valid is kept)", action="store_true")
    debug: bool = flag(False, "print the traceback of an error", action="store_true")


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    """speed and memory (the images do not depend on them)"""
    dtype: str = flag("auto", "diffusion model precision (auto: float16 on CUDA, float32 on a "
                      "CPU)", choices=("auto", "float16", "bfloat16", "float32"))
    vae_checkpointing: bool = flag(False, "gradient checkpointing in the guidance decoder: "
                                   "about a sixth of its activation memory, one more decoder "
                                   "forward per guided step", action="store_true")
    guidance_vae: str | None = flag(None, "AutoencoderTiny id or folder (TAESD: "
                                    "madebyollin/taesd) for the guidance decode only (default: "
                                    "the SD VAE). An approximation of the method's gradient: "
                                    "measure it with --check-guidance before trusting it",
                                    type=str)
    channels_last: bool | None = flag(None, "channels_last memory format for the convolutions "
                                      "(default: on with CUDA, where it is faster, off on a "
                                      "CPU)", action=argparse.BooleanOptionalAction)
    compile: bool = flag(False, "torch.compile the UNet (minutes of compile, faster steps)",
                         action="store_true")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, but none where there is none (None) or it is off."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# The range of each flag's value, checked as argparse reads it (any float flag: finite).
POSITIVE, AT_LEAST_0 = (lambda v: v > 0, "positive"), (lambda v: v >= 0, "at least 0")
FLAG_RANGES = {
    **dict.fromkeys(("per_class", "steps", "gen_batch", "batch_size", "image_size", "height",
                     "width", "guidance_every", "guidance_batch", "teacher_input_size", "pr_k",
                     "sheet_classes", "scenes_per_class", "check_classes", "check_seeds",
                     "max_new_images", "epochs_this_run", "lr", "kd_temperature",
                     "energy_temperature", "teacher_std"), POSITIVE),
    **dict.fromkeys(("cfg", "energy_scale", "class_scale", "neighbours", "weight_decay", "epochs",
                     "store_size"), AT_LEAST_0),
    **dict.fromkeys(("guidance_start", "guidance_end", "photo_share"),
                    (lambda v: 0 <= v <= 1, "in [0, 1]")),
    "crop_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 63, "in [0, 2^63)"),
    "workers": (lambda v: 0 <= v <= usable_cores(), "from 0 to the CPU cores this process may use"),
    **dict.fromkeys(("out", "sd_model", "llm"), (str.strip, "a name, not blank")),
}


def checked(kind, test=lambda value: True, words=""):
    """An argparse type: `kind` of the text, refused unless finite (a float) and `test` holds."""
    def parse(text):
        value = kind(text)
        finite = kind is not float or math.isfinite(value)
        if not (finite and test(value)):
            raise argparse.ArgumentTypeError(f"must be {words if finite else 'finite'}, got "
                                             f"{text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse: "invalid int value: 'many'"
    return parse


def build_parser():
    """Every flag: --field-name for each field with a help text of the defaults classes (a group
    each, titled by its docstring), with its default and its FLAG_RANGES range."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                            formatter_class=DefaultsHelpFormatter)
    for defaults in (CommandLineOptions(), RUN, MODELS, PROMPTS, SAMPLING, SpeedOptions(),
                     DISTILL, MEASURE):
        group = parser.add_argument_group(type(defaults).__doc__)
        for field in dataclasses.fields(defaults):
            options = dict(field.metadata)
            if options.get("action") in (None, "append", "extend"):  # a value: its type, checked
                kind = options.get("type", str if field.default is None else type(field.default))
                options["type"] = checked(kind, *FLAG_RANGES.get(field.name, ()))
            if "help" in options:  # else not a flag
                group.add_argument("--" + field.name.replace("_", "-"), default=field.default,
                                   **options)
    return parser


def parse_args(argv):
    """The flags of `argv`, each checked as it is read (FLAG_RANGES), then together; --smoke
    (--benchmark on a CPU) shrinks the defaults, not explicit flags. The machine decides the
    defaults of --workers, --channels-last and --dtype."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    cuda = known.device.startswith("cuda") or known.device == "auto" and torch.cuda.is_available()
    if known.smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
    if known.benchmark and not cuda:
        parser.set_defaults(**BENCHMARK_CPU_DEFAULTS)
    args = parser.parse_args(argv)
    args.ablate = list(dict.fromkeys(args.ablate or []))  # --ablate a --ablate b: both, once
    args.workers = default_workers() if args.workers is None else args.workers
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.dtype = ("float16" if cuda else "float32") if args.dtype == "auto" else args.dtype
    named_val_sets(args.val_dir)
    if args.guidance_start >= args.guidance_end:
        raise UsageError(f"guidance window must satisfy --guidance-start < --guidance-end, got "
                         f"{args.guidance_start} and {args.guidance_end}")
    if args.cfg <= 1 and os.environ.get("RANK", "0") == "0":
        report("warning", f"--cfg {args.cfg} <= 1 turns classifier-free guidance off: images "
                          f"follow the prompts weakly")
    if not (args.smoke or os.path.isfile(args.teacher)):  # a file: a TorchScript teacher
        known_classifier(args.teacher, "teacher")
    if not args.smoke:
        known_classifier(args.student, "student")
    return args


# Schedulers whose steps cannot be read as z_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε with alpha_bar_at's ᾱ:
# KDPM2's second-order stage scales the model input by interpolated sigmas (an oracle with a
# fixed x0 and ε drifts by 30 there, against ≤ 4e-5 for DDIM, PNDM, Euler, LMS, Heun, DPM++,
# UniPC, DEIS and v-prediction).
UNGUIDABLE_SCHEDULERS = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


# What a scheduler keeps of past steps (PNDM, LMS, DPM++ and UniPC/DEIS; the first stage of
# second-order ones, which diffusers marks order 2: Heun, KDPM2, DPM-Solver SDE): with it, a
# guided ε̂ enters later updates too.
PAST_STEP_STATE = ("ets", "derivatives", "model_outputs", "sample", "prev_derivative")


def check_sampler(pipe, options):
    """Refuses sampling options (energy_guided_sample's keywords) that cannot mean what they say
    with this model: more steps than it was trained with, a size no multiple of the VAE's factor;
    with guidance, a model predicting neither ε nor v, KDPM2, a window holding none of the
    scheduler's own timesteps (PNDM makes one more than asked), and a multistep scheduler guided
    on some steps only: it mixes the last few ε̂, so a push every second step enters four later
    updates with weights of both signs (along g, SD 1.5's PNDM moves the latent +15, -3, +26, +2,
    +31 where DDIM moves +7, +7, +13, +13). The push of §2 is a single-step scheduler's."""
    options, scheduler = {**SAMPLER, **options}, pipe.scheduler
    name, steps = type(scheduler).__name__, options["num_steps"]
    trained = scheduler.config.num_train_timesteps
    if steps > trained:
        raise UsageError(f"--steps {steps} is more than the {trained} steps the model was "
                         f"trained with")
    factor, size = pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor
    if (options["height"] or size) % factor or (options["width"] or size) % factor:
        raise UsageError(f"--height and --width must be multiples of {factor}, got "
                         f"{options['height'] or size}x{options['width'] or size}")
    if not (options["energy_scale"] or options["class_scale"]):
        return
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(f"energy guidance supports epsilon and v_prediction models, not "
                         f"'{scheduler.config.prediction_type}'")
    if name in UNGUIDABLE_SCHEDULERS:
        raise UsageError(f"energy guidance cannot use {name} (its second-order stage has no "
                         f"ᾱ_t for Tweedie's ẑ0); use e.g. DDIM, PNDM, Euler or DPM++")
    scheduler.set_timesteps(steps)
    start, end, every = (options[k] for k in ("guidance_start", "guidance_end", "guidance_every"))
    guided = guided_step_indices(len(scheduler.timesteps), start, end, every)
    if not guided:
        raise UsageError(f"the guidance window [{start}, {end}) every {every} holds none of the "
                         f"{len(scheduler.timesteps)} sampling steps, so guidance would do "
                         f"nothing: widen it, or --ablate guidance")
    multistep = getattr(scheduler, "order", 1) > 1 or any(
        hasattr(scheduler, state) for state in PAST_STEP_STATE)
    if multistep and guided != set(range(len(scheduler.timesteps))):
        raise UsageError(f"{name} is a multistep scheduler: it reuses past steps' noise "
                         f"predictions, so guiding only some steps pushes the latents back and "
                         f"forth; use --scheduler DDIMScheduler (the default), or guide every "
                         f"step (--guidance-start 0 --guidance-end 1 --guidance-every 1)")


# ──────────────────────────────────────────────────────────────────────────────────────────
# Before any work: models loaded, inputs checked, what --out holds read; the frame of main()
# ──────────────────────────────────────────────────────────────────────────────────────────
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
    """The JSON object prism wrote at `path`. One that does not parse or lacks what we need (does
    not fit `shape`) is damaged: a UsageError naming it and `way_out`; None with `overwrite`."""
    try:
        stored = read_json(path, way_out)
        if not fits(stored, shape):
            raise damaged(path, f"its {' and '.join(shape)} are missing or malformed", way_out)
    except UsageError:
        if overwrite:
            return None
        raise
    return stored


def read_prompts(path, num_classes, per_class, *, overwrite=False):
    """(prompts, classes) of prompts.json, at least `per_class` prompts and describe_classes'
    entry for each class (read_ours: damaged, or None with `overwrite`)."""
    entry = {"name": str, "description": str, "source": str, "neighbours": [str],
             "scenes": [str], "scene_source": str}
    stored = read_ours(path, {"prompts": [[str, per_class], num_classes, num_classes],
                              "classes": [entry, num_classes, num_classes]},
                       "rerun with --overwrite to remake the prompts", overwrite=overwrite)
    return stored and (stored["prompts"], stored["classes"])


def reusable_prompts(path, settings, num_classes, *, overwrite):
    """True if OUT/prompts.json holds intact prompts made under `settings`; a UsageError when
    it was made under others or is damaged (unless `overwrite`: then False)."""
    return bool(check_settings(path, settings, overwrite=overwrite, what="prompts")
                and read_prompts(path, num_classes, settings["per_class"], overwrite=overwrite))


def read_llm_answers(path, *, overwrite):
    """The LLM answers cached in OUT/llm_answers.json, {llm name: {question: answer}}; {} when
    there are none (or, with `overwrite`, when the file is damaged)."""
    stored = path.exists() and read_ours(path, {"answers": {str: {str: str}}}, "delete it (it "
                                         "only caches LLM answers) or rerun with --overwrite",
                                         overwrite=overwrite)
    return stored["answers"] if stored else {}


def real_models(args, device, models):
    """Sets the teacher (--teacher, --teacher-weights), the untrained student (--student) and
    the classes (--data) of a real run in `models`, and in its identity what decides the pixels
    (files by their fingerprint)."""
    names, models.descriptions = (load_class_names(args.data) if args.data != "imagenet"
                                  else (None, None))
    locate_model(args.sd_model, "--sd-model")  # found or refused in seconds, before the teacher
    with rank_zero_first():
        models.teacher, teacher_names = load_teacher(
            args.teacher, device, weights_path=args.teacher_weights,
            num_classes=len(names) if names else 1000,
            input_size=args.teacher_input_size, mean=args.teacher_mean, std=args.teacher_std)
    models.class_names = names or teacher_names or load_class_names("imagenet")[0]
    with torch.no_grad():  # the number of logits, on a blank image
        outputs = models.teacher(torch.zeros(1, 3, 64, 64, device=device)).shape[-1]
    if outputs != len(models.class_names):
        raise UsageError(f"class list '{args.data}' has {len(models.class_names)} classes but "
                         f"the teacher has {outputs} outputs")
    preprocess = models.teacher[0]
    mean, std = preprocess.mean.flatten().tolist(), preprocess.std.flatten().tolist()
    models.student = build_student(args.student, len(models.class_names),
                                   input_size=args.image_size, mean=mean, std=std)
    files = [f for f in (args.teacher, args.teacher_weights) if f and os.path.isfile(f)]
    models.identity.update(teacher=" ".join([args.teacher, *map(file_fingerprint, files)]),
                           teacher_preprocess=[preprocess.input_size, *mean, *std])


def load_models(args, device):
    """(out, models): --out, and a namespace of the teacher, the student, class_names (and
    descriptions), `identity` (what decides the pixels), the prompt settings (all the prompts
    depend on) and the LLM (None; with --smoke, a tiny random one as the models). The student
    is tried on --image-size now."""
    if args.batch_size % rank_and_world()[1]:  # said now, not after hours of synthesis
        raise UsageError(f"--batch-size {args.batch_size} is global: it must be a multiple of the "
                         f"{rank_and_world()[1]} processes")
    tiny = {"sd_model": "tiny-random", "teacher": "tiny-random"} if args.smoke else {}
    models = types.SimpleNamespace(descriptions=None, class_names=list(SMOKE_CLASSES), identity={
        "sd_model": args.sd_model, "dtype": str(getattr(torch, args.dtype)), **tiny})
    if args.smoke:
        models.teacher = build_tiny_classifier(len(SMOKE_CLASSES), seed=args.seed)
        models.teacher.to(device).eval().requires_grad_(False)
        models.student = build_tiny_classifier(len(SMOKE_CLASSES), width=8,
                                               input_size=args.image_size, seed=args.seed + 1)
    else:
        real_models(args, device, models)
    if args.guidance_vae:
        models.identity["guidance_vae"] = args.guidance_vae
    try:
        with torch.no_grad():
            models.student.eval()(torch.zeros(2, 3, args.image_size, args.image_size))
    except RuntimeError as error:
        raise UsageError(f"--image-size {args.image_size} does not fit the student: "
                         f"{first_line(error)}")
    models.student.train()
    ablate = sorted(set(args.ablate) - {"guidance"})
    models.llm = None if args.llm == "none" else "tiny-random" if args.smoke else args.llm
    models.prompt_settings = {
        "classes": models.class_names, "descriptions": models.descriptions,
        "per_class": args.per_class, "seed": args.seed, "photo_share": args.photo_share,
        "neighbours": args.neighbours, **({"scenes_per_class": args.scenes_per_class}
                                          if models.llm else {}),  # the LLM's alone
        "llm": models.llm, "teacher": models.identity["teacher"],
        "text_encoder": models.identity["sd_model"], **({"ablate": ablate} if ablate else {})}
    return Path(args.out), models


def labelled_test_sets(args, models):
    """The --val-dir sets (labelled_sets: every folder mapped to its class, every image decoded),
    checked now although evaluation reads them last; and --pr-k against the set sizes."""
    class_ids = None if args.class_ids is None else (args.class_ids, [row[0] for row in read_lines(
        args.class_ids, "--class-ids", len(models.class_names))])
    test_sets = labelled_sets(named_val_sets(args.val_dir), models.class_names, class_ids,
                              checked_file=Path(args.out) / "checked_images.json")
    real_images = test_sets[0]["images"] if test_sets else math.inf  # precision/recall's set
    smallest = min(len(models.class_names) * args.per_class, real_images)
    if args.pr_k >= smallest:
        raise UsageError(f"--pr-k {args.pr_k} needs more than {args.pr_k} images on each side; "
                         f"the smaller set has {smallest}")
    return test_sets


def load_sampler(args, device, out):
    """(pipe, guidance_vae or None): the diffusion pipeline (--smoke: a tiny random one saved
    under OUT/tiny-models first) with the command line's scheduler, speed and memory options,
    and the sampling flags checked against it before anything is recorded."""
    dtype = getattr(torch, args.dtype)
    sd_model = out / "tiny-models" / "pipeline" if args.smoke else args.sd_model
    if args.smoke and rank_and_world()[0] == 0:
        build_tiny_pipeline(out / "tiny-models", image_size=args.height, seed=args.seed)
    with rank_zero_first():
        pipe = speed_up_pipeline(load_diffusion_pipeline(sd_model, device, dtype),
                                 channels_last=args.channels_last, compile_unet=args.compile)
        guidance_vae = args.guidance_vae and load_guidance_vae(args.guidance_vae, device, dtype)
    if args.scheduler != "model":
        import diffusers

        kind = getattr(diffusers, args.scheduler, None)
        if kind not in pipe.scheduler.compatibles:
            names = sorted(k.__name__ for k in pipe.scheduler.compatibles)
            raise UsageError(f"--scheduler {args.scheduler}: not a scheduler this model can use; "
                             f"give 'model' or one of {', '.join(names)}")
        pipe.scheduler = kind.from_config(pipe.scheduler.config)
    if args.vae_checkpointing:  # recomputes the decoder's activations in the backward pass
        (guidance_vae or pipe.vae).enable_gradient_checkpointing()
    check_sampler(pipe, sampling_options(args))
    return pipe, guidance_vae


def check_llm_available(args, out, settings):
    """Fails fast, before the diffusion model loads, when the prompts must be made with an LLM
    that cannot be found or loaded (its config) and whose answers OUT/llm_answers.json lacks."""
    if (args.smoke or not settings["llm"]
            or reusable_prompts(out / "prompts.json", settings, len(settings["classes"]),
                                overwrite=args.overwrite)
            or settings["llm"] in read_llm_answers(out / "llm_answers.json",
                                                   overwrite=args.overwrite)):
        return
    from transformers import AutoConfig

    load_pretrained(args.llm, "--llm", "LLM", lambda source, local: AutoConfig.from_pretrained(
        source, local_files_only=local), "--llm none")


@contextlib.contextmanager
def errors_reported(argv):
    """The frame of main(), yielding a namespace whose `code` is the exit code: an error inside is
    one line on stderr, code 2 for a UsageError or OSError (bad input, damaged state, a disk),
    1 for a failure (--debug in `argv` adds the traceback), 130 for Ctrl-C. Quiets the libraries'
    logging and progress bars; leaves torchrun's process group."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    status, failure, debug = types.SimpleNamespace(code=0), None, "--debug" in argv
    try:
        yield status
    except KeyboardInterrupt as error:
        status.code, kind, failure = 130, "interrupted", error
        message = "rerun the same command to resume"
    except (UsageError, OSError) as error:
        status.code, kind, message, failure = 2, "error", str(error), error
    except Exception as error:  # a failure: say what, in one line; --debug shows where
        status.code, kind, failure = 1, "failed", error
        message = (str(error) if isinstance(error, RunFailure) else
                   "out of GPU memory; rerun the same command with a smaller --gen-batch or "
                   "--guidance-batch (or --vae-checkpointing): nothing done is redone"
                   if isinstance(error, torch.OutOfMemoryError) else
                   f"{type(error).__name__}: {first_line(error)}"
                   + ("" if debug else " (rerun with --debug for the traceback)"))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if failure is not None:
        if debug:
            traceback.print_exception(failure)
        report(kind, message)


# ──────────────────────────────────────────────────────────────────────────────────────────
# The stages main() runs: the method's functions with resume, processes and files around them
# ──────────────────────────────────────────────────────────────────────────────────────────
def sampling_options(args):
    """The keyword arguments of energy_guided_sample that the command line sets (all of them
    decide the pixels, so they are recorded in the synthetic set's settings)."""
    guided = "guidance" not in args.ablate
    return dict(num_steps=args.steps, cfg_scale=args.cfg, temperature=args.energy_temperature,
                energy_scale=args.energy_scale if guided else 0.0,
                class_scale=args.class_scale if guided else 0.0,
                guidance_start=args.guidance_start, guidance_end=args.guidance_end,
                guidance_every=args.guidance_every, exact_grad=args.exact_grad,
                normalize_grad=not args.no_grad_norm, height=args.height, width=args.width)


def prompts_stage(args, out, models, pipe, device):
    """Stage 1 (§3): the prompts of every class and where each part came from, (prompts,
    classes), made once (make_prompts, on rank 0) and reused from OUT/prompts.json; OUT/prompts.md
    shows them to a person. The other ranks read the file rank 0 writes."""
    path = out / "prompts.json"
    settings, num_classes = models.prompt_settings, len(models.class_names)
    reuse = reusable_prompts(path, settings, num_classes, overwrite=args.overwrite)
    barrier()  # every rank has its verdict before rank 0 may replace the file
    on_rank_zero(lambda: reuse or make_prompts(args, out, models, pipe, device))
    prompts, classes = read_prompts(path, num_classes, args.per_class)
    text = prompts_markdown(classes, prompts, models.llm)
    markdown = out / "prompts.md"  # rewritten whenever it is not what prompts.json holds
    if rank_and_world()[0] == 0 and (not markdown.exists() or markdown.read_bytes()
                                     != text.encode("utf-8")):
        atomic_write(markdown, lambda temp: temp.write_text(text, encoding="utf-8"))
    return prompts, classes


def make_prompts(args, out, models, pipe, device):
    """Builds the prompts (build_prompts with the command line's options) and writes them to
    OUT/prompts.json, after the LLM's answers to OUT/llm_answers.json: the LLM is loaded only
    for questions that file does not answer yet."""
    answers_path = out / "llm_answers.json"
    cache = read_llm_answers(answers_path, overwrite=args.overwrite) if models.llm else {}
    answers = dict(cache.get(models.llm, {}))
    llm = (build_tiny_llm(out / "tiny-models" / "llm") if models.llm == "tiny-random"
           else models.llm)
    prompts, classes = build_prompts(
        models.class_names, args.per_class, teacher=models.teacher, llm=llm,
        descriptions=models.descriptions, text_encoder=(pipe.tokenizer, pipe.text_encoder),
        answers=answers, neighbours=args.neighbours, photo_share=args.photo_share,
        scenes_per_class=args.scenes_per_class, seed=args.seed, llm_device=device,
        disambiguate="disambiguation" not in args.ablate,
        vary_content="content" not in args.ablate, vary_style="style" not in args.ablate)
    if models.llm:  # the other LLMs' answers are kept
        write_json_atomic({"answers": {**cache, models.llm: answers}}, answers_path)
    write_json_atomic({"settings": models.prompt_settings, "prompts": prompts,
                       "classes": classes}, out / "prompts.json")


def prompts_written(out):
    """--prompts-only: says where the prompts are and what to do next; the exit code 0."""
    if rank_and_world()[0] == 0:
        print(f"prompts: {out / 'prompts.json'}; read {out / 'prompts.md'} before the long run, "
              f"then run the same command without --prompts-only")
    return 0


def synthesis_stage(args, out, models, prompts, classes, pipe, guidance_vae):
    """Stages 2-3 (§1-2): the energy-guided synthetic set in OUT/synthetic, checked against its
    settings first, resumed image by image, split over the ranks. Returns (records, settings),
    records None while images are missing (--max-new-images), and draws the contact sheet with
    each class's prompt source (`classes`: describe_classes' entries)."""
    rank, synthetic = rank_and_world()[0], out / "synthetic"
    sample_kwargs = sampling_options(args)
    identity = {**models.identity, "scheduler": type(pipe.scheduler).__name__}
    settings = synthesis_settings(prompts, per_class=args.per_class, seed=args.seed,
                                  image_format=args.image_format, identity=identity,
                                  store_size=args.store_size or None, sample_kwargs=sample_kwargs)
    check_settings(synthetic / "settings.json", settings, overwrite=args.overwrite,
                   what="synthetic images")
    if pipe.device.type == "cpu" and not args.smoke and rank == 0:  # once every input passed
        print("warning: running on the CPU; a real run needs a CUDA GPU", file=sys.stderr)
    records = synthesize_dataset(
        pipe, models.teacher, prompts, synthetic, per_class=args.per_class, seed=args.seed,
        batch_size=args.gen_batch, image_format=args.image_format, identity=identity,
        store_size=args.store_size or None, overwrite=args.overwrite,
        max_new_images=args.max_new_images, guidance_vae=guidance_vae,
        guidance_batch=args.guidance_batch, **sample_kwargs)
    wanted = len(models.class_names) * args.per_class
    if len(records) < wanted:
        if rank == 0:
            print(f"synthesis: {len(records)} of {wanted} images cached; rerun the same command "
                  f"to continue")
        return None, settings
    sheet = out / "contact_sheet.png"
    if rank == 0 and (not sheet.exists() or sheet.stat().st_mtime_ns
                      < (synthetic / "manifest.jsonl").stat().st_mtime_ns):  # the set changed
        contact_sheet(synthetic, models.class_names, sheet, max_classes=args.sheet_classes,
                      sources=[entry["source"] for entry in classes])
    return records, settings


def distillation_stage(args, out, models, data_settings, results, device):
    """Stage 4 (§4): distils the teacher into models.student on OUT/synthetic, resumed from
    OUT/checkpoint.pt (--epochs 0: none). Adds the KD losses to `results` and saves student.pt;
    False while epochs are missing (--epochs-this-run)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the diffusion model held
    if args.epochs == 0:
        return True
    history = distill_resumable(
        models.teacher, models.student, out / "synthetic", out / "checkpoint.pt",
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=args.kd_temperature,
        device=device, image_size=args.image_size,
        weight_decay=args.weight_decay, num_workers=args.workers, seed=args.seed,
        data_settings=json.loads(json.dumps(data_settings)), epochs_this_run=args.epochs_this_run,
        overwrite=args.overwrite, channels_last=args.channels_last, crop_scale=args.crop_scale)
    results["distill"] = {"epochs_done": len(history), "kd_loss": history}
    if len(history) < args.epochs:
        if rank_and_world()[0] == 0:
            print(f"distillation: {len(history)} of {args.epochs} epochs done; rerun the same "
                  f"command to continue")
        return False
    if rank_and_world()[0] == 0:
        save_torch_atomic(models.student.state_dict(), out / "student.pt")
    return True


def measurement_stage(args, out, models, records, test_sets, results, device):
    """Stage 5 (§5): the synthetic set in the teacher's features, against the first (the
    in-distribution) test set when there is one (with --smoke and none, the synthetic set stands
    in), then teacher and student on every test set. Adds both to `results`."""
    synthetic, rank = out / "synthetic", rank_and_world()[0]
    if not test_sets and args.smoke:
        test_sets = labelled_sets([("synthetic", synthetic)], models.class_names)
    if rank == 0:  # one process measures; the others wait at the barrier below
        features = dict(eval_sizes(models.teacher), device=device, num_workers=args.workers)
        fake_features, fake_labels = extract_features(models.teacher, synthetic, **features)
        results["synthetic"] = synthetic_set_report(records, fake_features, models.class_names)
        if test_sets:
            real = test_sets[0]
            real_features, real_labels = extract_features(models.teacher, real["data"],
                                                             classes=real["classes"], **features)
            # a set of some classes (ImageNet-R first) is compared with those classes' images
            shared = torch.isin(fake_labels, torch.tensor(real["classes"]))
            results["precision_recall"] = {"set": real["name"], "data": real["data"],
                                           "classes": len(real["classes"]),
                                           **precision_recall_report(
                real_features.to(device), real_labels.to(device), fake_features[shared].to(device),
                fake_labels[shared].to(device), models.class_names, k=args.pr_k)}
    barrier()
    if test_sets:
        student = models.student if args.epochs > 0 else None
        results["evaluation"] = evaluate_sets(test_sets, models.teacher, student,
                                              len(models.class_names), device=device,
                                              image_size=args.image_size, num_workers=args.workers,
                                              teacher_sizes=eval_sizes(models.teacher))


def write_results(args, out, results, num_classes):
    """Rank 0 writes OUT/results.json and prints its summary (no per-class lists) and the
    teacher/student table of the test sets."""
    if rank_and_world()[0] != 0:
        return
    write_json_atomic(results, out / "results.json")
    print(json.dumps(without_per_class(results), indent=1))
    if "evaluation" in results:
        print(evaluation_table(results["evaluation"]["sets"], num_classes))
    print(f"per-class reports: {out / 'results.json'}; what was generated: "
          f"{out / 'contact_sheet.png'}")
    if args.smoke:
        print("smoke run done: every stage ran end to end on tiny random models (plumbing, not "
              "accuracy)")


# ══════════════════════════════════════════════════════════════════════════════════════════
# PART III — TOOLS: reports for a person to read, tiny models, the benchmark
# ══════════════════════════════════════════════════════════════════════════════════════════
# ──────────────────────────────────────────────────────────────────────────────────────────
# Reports: prompts.md, the contact sheet, the evaluation table
# ──────────────────────────────────────────────────────────────────────────────────────────
def prompt_sources(classes, llm):
    """Where the prompts' parts came from (§3), for results.json: how many classes took their
    description from each source ("file", "llm", "neighbours", "name") and their scenes from
    each ("llm", "built-in <group>"), and per class."""
    count = lambda key: dict(collections.Counter(entry[key] for entry in classes))  # noqa: E731
    return {"llm": llm, "description_sources": count("source"),
            "scene_sources": count("scene_source"),
            "per_class": [{"class": c, "name": e["name"], "description": e["description"],
                           "source": e["source"], "scene_source": e["scene_source"]}
                          for c, e in enumerate(classes)]}


SOURCE_WORDS = {"file": "the class file", "llm": "the LLM", "name": "none: the bare name",
                "neighbours": "the teacher's neighbours (their category)"}


def llm_said(entry, part, *, max_lines=20, width=160):
    """prompts.md lines that show the LLM's answer for `part` ("description" or "scenes") as it
    wrote it, where cleaning changed it (the entry's "llm_raw"), trimmed; [] where it did not."""
    raw = entry.get("llm_raw", {}).get(part)
    if raw is None:
        return []
    said = ["".join(ch for ch in line if ch.isprintable())[:width]
            for line in raw.splitlines() if line.strip()]
    more = [f"  ... ({len(said) - max_lines} more lines)"] if len(said) > max_lines else []
    return [f"- the LLM said ({part}), before cleaning:", "  ```text",
            *[f"  {line}" for line in said[:max_lines]], *more, "  ```"]


def prompts_markdown(classes, prompts, llm, *, shown=5):
    """prompts.md: for a person to read before the long run. A count of the sources, then per
    class its description and where it came from, its teacher neighbours (which tell the sense
    and are not drawn), where its scenes came from and `shown` of its prompts; beside the
    description and scenes, the LLM's answer as it wrote it where cleaning changed it."""
    sources = prompt_sources(classes, llm)
    lines = ["# Prompts", "", f"LLM: {llm or 'none (built-in lists)'}. Descriptions from: "
             + ", ".join(f"{SOURCE_WORDS.get(k, k)} {n}" for k, n in
                         sources["description_sources"].items())
             + ". Scenes from: " + ", ".join(f"{k} {n}" for k, n in
                                           sources["scene_sources"].items()) + ".", "",
             "Look for a wrong sense of an ambiguous name, scenes that do not suit the class, "
             "and other classes named in a prompt (they would be drawn). Fix a class by giving "
             "it a description in a class file (`--data FILE`, `name<TAB>description`).", ""]
    for c, (entry, class_prompts) in enumerate(zip(classes, prompts)):
        lines += [f"## {c} {entry['name']}", "",
                  f"- description: {entry['description'] or '(none)'} — from "
                  f"{SOURCE_WORDS.get(entry['source'], entry['source'])}",
                  *llm_said(entry, "description"),
                  f"- teacher neighbours: {', '.join(entry['neighbours']) or '(none)'}",
                  f"- scenes: {len(entry['scenes'])} from {entry['scene_source']}",
                  *llm_said(entry, "scenes"),
                  f"- {min(shown, len(class_prompts))} of its {len(class_prompts)} prompts:"]
        lines += [f"  - {prompt}" for prompt in class_prompts[:shown]] + [""]
    return "\n".join(lines)


def contact_sheet(data_dir, class_names, path, *, max_classes=MEASURE.sheet_classes, per_row=8,
                  tile=96, label_width=160,
                  sources=None):
    """Writes a PNG of the cached set for a person to look at: one row per class (all classes when
    at most `max_classes`, else that many spread evenly), its name on the left (and under it the
    source of its description, `sources[c]`, when given), then up to `per_row` of its images.
    Returns the number of image tiles drawn."""
    from PIL import Image, ImageDraw

    folders = sorted(entry for entry in Path(data_dir).iterdir()
                     if entry.is_dir() and entry.name.isdigit())
    rows = (range(len(class_names)) if len(class_names) <= max_classes else
            [round(n * (len(class_names) - 1) / max(max_classes - 1,
                                                    1)) for n in range(max_classes)])
    shown = [sorted(p for p in folders[c].iterdir() if p.suffix in (".png", ".jpg"))[:per_row]
             if c < len(folders) else [] for c in rows]
    columns = max([len(images) for images in shown] + [1])
    sheet = Image.new("RGB", (label_width + columns * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (c, images) in enumerate(zip(rows, shown)):
        draw.text((4, row * tile + tile // 2 - 6), f"{c}: {class_names[c]}"[:label_width // 6],
                  fill="black")
        if sources:
            draw.text((4, row * tile + tile // 2 + 6), f"[{sources[c]}]"[:label_width // 6],
                      fill="gray")
        for column, image_path in enumerate(images):
            with Image.open(image_path) as image:
                sheet.paste(image.convert("RGB").resize((tile, tile)),
                            (label_width + column * tile, row * tile))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write(path, lambda temp: temp.write_bytes(buffer.getvalue()))
    return sum(len(images) for images in shown)


def evaluation_table(sets, num_classes):
    """evaluate_sets' entries as one aligned text table, a row per set: images, classes (K/N when
    restricted to K of the N classes), teacher and student top-1 / top-5 (%) and the teacher →
    student top-1 gap, so that the gap on each domain is one glance; "-" without a student."""
    rows = [("set", "images", "classes", "teacher top-1", "top-5", "student top-1", "top-5",
             "gap top-1")]
    for s in sets:
        student = s.get("student")
        numbers = [s["teacher"]["top1"], s["teacher"]["top5"], *(
            (student["top1"], student["top5"], s["gap_top1"]) if student else [None] * 3)]
        classes = f"{s['classes']}" + (f"/{num_classes}" if s["classes"] != num_classes else "")
        rows.append((s["name"], str(s["teacher"]["images"]), classes,
                     *("-" if x is None else f"{x:.2f}" for x in numbers)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    # the set's name left-aligned, every number right-aligned under its heading
    return "\n".join("  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width
                                                             in zip(row[1:], widths[1:])]).rstrip()
                     for row in rows)


# ──────────────────────────────────────────────────────────────────────────────────────────
# Tiny random components: the offline smoke run and the tests (plumbing, not accuracy)
# ──────────────────────────────────────────────────────────────────────────────────────────
SMOKE_CLASSES = ("mouse", "crane", "kite", "tank")


def byte_level_alphabet():
    """The 256 printable characters that byte-level BPE tokenizers (CLIP, GPT-2) map bytes to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]


# Architectures of random pipelines: "tiny" for tests and the smoke run; "sd15" is Stable Diffusion
# 1.5's UNet (860M parameters) and VAE (84M) and CLIP ViT-L/14's text encoder (123M), for the
# benchmark: the same FLOPs as the trained models, with no download.
RANDOM_PIPELINES = {
    "tiny": dict(
        unet=dict(layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)),
    "sd15": dict(
        unet=dict(layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12,
                  vocab_size=49408, hidden_act="quick_gelu")),
}


def random_pipeline(vocab_dir, *, architecture="tiny", image_size=32, prediction_type="epsilon",
                    seed=0):
    """A randomly initialised StableDiffusionPipeline of one of RANDOM_PIPELINES (UNet, VAE, CLIP
    text encoder, DDIM with SD's schedule) and a character-level CLIP tokenizer whose files go to
    `vocab_dir`."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_dir, config = Path(vocab_dir), RANDOM_PIPELINES[architecture]
    vocab_dir.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    vocab = {token: n for n, token in enumerate(alphabet + [a + "</w>" for a in alphabet]
                                                   + ["<|startoftext|>", "<|endoftext|>"])}
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                              model_max_length=77)
    vae_factor = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **{"vocab_size": len(vocab), **config["text"]}, max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"]))
        unet = UNet2DConditionModel(sample_size=image_size // vae_factor, in_channels=4,
                                    out_channels=4, **config["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            sample_size=image_size, **config["vae"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_pipeline(model_dir, *, image_size=32, prediction_type="epsilon", seed=0):
    """Builds a tiny randomly initialised StableDiffusionPipeline (random_pipeline "tiny"), saves it
    to `model_dir` and returns that folder, which load_diffusion_pipeline opens exactly as it opens
    a real model."""
    model_dir = Path(model_dir)
    pipe = random_pipeline(model_dir / "vocab", image_size=image_size,
                           prediction_type=prediction_type, seed=seed)
    pipe.save_pretrained(model_dir / "pipeline")
    return model_dir / "pipeline"


def build_tiny_llm(model_dir, *, seed=0):
    """Builds a tiny randomly initialised GPT-2 with a byte-level tokenizer, saves it to
    `model_dir` like a hub model and returns that folder, which load_llm opens as it opens a
    real LLM. Its answers are random text: clean_line and the fallbacks must cope."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = {ch: n for n, ch in enumerate(byte_level_alphabet())}
    vocab["<|endoftext|>"] = len(vocab)
    (model_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (model_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = GPT2Tokenizer(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2,
                                           n_positions=1024, bos_token_id=len(vocab) - 1,
                                           eos_token_id=len(vocab) - 1))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def build_tiny_classifier(num_classes, *, width=16, input_size=32, seed=0):
    """A small random CNN with BatchNorm and a final nn.Linear, taking [0, 1] images of any size."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
    return with_preprocessing(model, input_size)


# ──────────────────────────────────────────────────────────────────────────────────────────
# Benchmark and --check-guidance: real architectures with random weights, timed
# ──────────────────────────────────────────────────────────────────────────────────────────
def peak_memory_gib(device):
    """Peak memory since the last reset_peak_memory (GiB): GPU memory allocated by torch on CUDA;
    on the CPU the process's peak resident set size so far (it never goes down)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def reset_peak_memory(device):
    """Starts a new peak-memory measurement (GPU only; the CPU peak RSS cannot be reset)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def timed(device, function):
    """(result, seconds) of function(), waiting for the GPU's queued work before each clock read."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = function()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def write_benchmark_images(folder, count, size, *, classes=10, seed=0, image_format="png"):
    """`count` images of `size`² in `classes` folders: smooth random colour fields with mild pixel
    noise, so that file sizes and decode times are near those of generated images."""
    generator = torch.Generator().manual_seed(seed)
    for n in range(count):
        coarse = torch.rand(1, 3, 8, 8, generator=generator)
        image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
        image = (image + 0.03 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
        (Path(folder) / f"{n % classes:04d}").mkdir(parents=True, exist_ok=True)
        save_image_atomic(image, Path(folder) / f"{n % classes:04d}/{n:05d}.{image_format}")


def time_sampling_modes(pipe, teacher, prompts, class_ids, latents, modes, *, repeats=1,
                        progress=True, **sample_kwargs):
    """Runs energy_guided_sample once per mode and round from the same latents; returns one row
    per mode: seconds per image (the fastest round), its ratio to the first mode's, peak memory
    (GiB) and the stats of the images. Rounds visit the modes in turn, so drifts of the machine
    (clock, caches, other load) hit every mode alike; a 2-step run per mode warms it up first."""
    rows = {mode: {"mode": mode, "s_per_image": math.inf, "peak_memory_gib": 0.0} for mode in modes}
    rounds = [(round_index, mode) for round_index in range(repeats) for mode in modes]
    for round_index, mode in tqdm(rounds, desc="timing sampling modes", disable=not progress):
        sample = dict(sample_kwargs, latents=latents, **modes[mode])
        if round_index == 0:
            energy_guided_sample(pipe, teacher, prompts, class_ids, **dict(sample, num_steps=2))
        reset_peak_memory(pipe.device)
        (_, stats), seconds = timed(pipe.device, lambda: energy_guided_sample(
            pipe, teacher, prompts, class_ids, **sample))
        row = rows[mode]
        row["s_per_image"] = min(row["s_per_image"], seconds / len(prompts))
        row["peak_memory_gib"] = max(row["peak_memory_gib"], peak_memory_gib(pipe.device))
        row["stats"] = stats
    rows = list(rows.values())
    for row in rows:
        row["vs_unguided"] = row["s_per_image"] / rows[0]["s_per_image"]
    return rows


def time_guidance_parts(pipe, teacher, latents, class_ids, *,
                        guidance_batch=SAMPLING.guidance_batch, repeats=2,
                        **objective):
    """Seconds per image of the parts of a sampling step, the fastest of `repeats`: one UNet call
    (the CFG pair, no gradient); one guidance gradient (clean_latent_grad: the decode of ẑ0 with
    its backward pass and the teacher's, what approx mode adds to a step); the teacher alone
    (forward and backward on decoded images); the final decode. A guided step costs the UNet
    call plus the guidance gradient, an unguided one the UNet call."""
    device, batch = pipe.device, len(latents)
    text, uncond = encode_prompts(pipe, [""] * batch, cfg_scale=3.0)
    pipe.scheduler.set_timesteps(50, device=device)
    t = pipe.scheduler.timesteps[10]
    class_ids = torch.as_tensor(class_ids, device=device)
    images = decode_to_unit(pipe.vae, latents).float().requires_grad_(True)

    def teacher_alone():
        loss = guidance_loss(teacher(images), class_ids, **objective)
        return torch.autograd.grad(loss.sum(), images)

    parts = {"UNet step (CFG pair)": lambda: cfg_prediction(pipe.unet, latents, t, text, uncond,
                                                            cfg_scale=SAMPLING.cfg),
             "guidance gradient (decode + backward + teacher)": lambda: clean_latent_grad(
                 pipe.vae, teacher, latents, class_ids, batch_size=guidance_batch, **objective),
             "teacher alone (forward + backward)": teacher_alone,
             "final decode": lambda: decode_to_unit(pipe.vae, latents)}
    seconds = {}
    for name, part in parts.items():
        with torch.no_grad() if name.startswith(("UNet", "final")) else contextlib.nullcontext():
            part()  # warm-up
            seconds[name] = min(timed(device, part)[1] for _ in range(repeats)) / batch
    return seconds


def benchmark_models(work_dir, device, dtype, architecture, height, image_size, channels_last,
                     compile_unet):
    """(pipe, teacher, students) for benchmark(): a random pipeline of `architecture` on
    `device`, frozen, with the speed options; a random resnet50 teacher and two resnet18
    students, the same in every run."""
    pipe = random_pipeline(work_dir / "vocab", architecture=architecture, image_size=height)
    pipe = speed_up_pipeline(pipe.to(device, dtype), channels_last=channels_last,
                             compile_unet=compile_unet)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same random teacher and students in every run
        teacher = with_preprocessing(torchvision.models.resnet50(), 224)
        students = [with_preprocessing(torchvision.models.resnet18(), image_size)
                    for _ in range(2)]
    return pipe, teacher.to(device).eval().requires_grad_(False), students


def benchmark(device, work_dir, *, height=512, width=512, steps=SAMPLING.steps,
              gen_batch=SAMPLING.gen_batch, kd_batch=DISTILL.batch_size,
              image_size=DISTILL.image_size, num_workers=8, channels_last=False,
              compile_unet=False, progress=True, architecture="sd15", repeats=2,
              guidance_batch=SAMPLING.guidance_batch, store_size=SAMPLING.store_size,
              image_format=SAMPLING.image_format):
    """Times synthesis and distillation at real model size with random weights (the same FLOPs as
    the trained models). Returns {"sampling": rows, "parts": seconds, "distill": row}.

    Sampling: Stable Diffusion 1.5's UNet and VAE and CLIP ViT-L's text encoder (fp16 on CUDA), a
    resnet50 teacher; `gen_batch` images, `steps` DDIM steps, the default guidance window and
    scales; one row per mode (time_sampling_modes), and the cost of each part of a step
    (time_guidance_parts). Distillation: resnet50 → resnet18 on images written to `work_dir` at
    the stored size and format (benchmark_distillation): the loader alone, pure compute and the
    whole loop; their ratios show whether loading is the bottleneck.
    `architecture` "tiny" swaps in the tiny pipeline (for the tests).
    """
    from diffusers import AutoencoderTiny

    device, work_dir = torch.device(device), Path(work_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe, teacher, students = benchmark_models(work_dir, device, dtype, architecture, height,
                                               image_size, channels_last, compile_unet)
    names = load_class_names("imagenet")[0]
    class_ids = list(range(gen_batch))
    prompts = [row[0] for row in build_prompts([names[c] for c in class_ids], 1)[0]]
    start = initial_latents(range(gen_batch), (4, height // pipe.vae_scale_factor,
                                               width // pipe.vae_scale_factor))
    start = start.to(device, dtype)
    checkpointed_vae = copy.deepcopy(pipe.vae)
    checkpointed_vae.enable_gradient_checkpointing()
    modes = {"unguided": dict(energy_scale=0.0, class_scale=0.0),
             "guided, default (approx, full-size decode)": {},
             "guided, VAE gradient checkpointing": dict(guidance_vae=checkpointed_vae),
             "guided, guidance batch 1": dict(guidance_batch=1),
             "guided, tiny autoencoder decode (approximation)": dict(  # TAESD's architecture
                 guidance_vae=AutoencoderTiny().to(device, dtype).requires_grad_(False)),
             "guided, exact (UNet backward)": dict(exact_grad=True)}
    rows = time_sampling_modes(pipe, teacher, prompts, class_ids, start, modes, repeats=repeats,
                               progress=progress, num_steps=steps, height=height, width=width,
                               guidance_batch=guidance_batch)
    for row in rows:
        row["mean_energy"] = row.pop("stats")["energy"].mean().item()
    parts = time_guidance_parts(pipe, teacher, start, class_ids, guidance_batch=guidance_batch,
                                energy_scale=SAMPLING.energy_scale,
                                class_scale=SAMPLING.class_scale)
    del pipe, modes, checkpointed_vae
    if device.type == "cuda":
        torch.cuda.empty_cache()

    kd = benchmark_distillation(teacher, students, work_dir, device, kd_batch=kd_batch,
                                image_size=image_size, num_workers=num_workers,
                                channels_last=channels_last, progress=progress,
                                stored_size=min(height, store_size or height),
                                image_format=image_format)
    memory = ("peak GPU memory (GiB)" if device.type == "cuda"
              else "peak RSS of the process so far (GiB)")
    return {"sampling": rows, "parts": parts, "memory": memory, "distill": kd}


def benchmark_distillation(teacher, students, work_dir, device, *, kd_batch, image_size,
                           num_workers,
                           channels_last, progress, stored_size, image_format):
    """Images per second, measured in one run on `kd_batch`·8 cached images of `stored_size`²: the
    loader alone (kd_loader: read, decode, augment, collate, in its second epoch, workers
    started), pure compute (kd_step on batches already on the device), and the whole distill()
    loop (its steady-state last of 3 epochs). Returns them and their ratios."""
    folder = work_dir / "images"
    shutil.rmtree(folder, ignore_errors=True)  # a fresh set and no checkpoint to resume from
    (work_dir / "checkpoint.pt").unlink(missing_ok=True)
    write_benchmark_images(folder, 8 * kd_batch, stored_size, image_format=image_format)
    loader, sampler = kd_loader(folder, kd_batch, image_size=image_size, num_workers=num_workers,
                                pin_memory=device.type == "cuda")
    for epoch in range(2):  # the first epoch starts the workers
        sampler.set_epoch(epoch)
        _, loader_seconds = timed(device, lambda: [batch for batch, _ in loader])
    states = []
    distill(teacher, students[0], folder, epochs=3, batch_size=kd_batch, lr=0.1,
            image_size=image_size, device=device, num_workers=num_workers, progress=progress,
            channels_last=channels_last, on_epoch=states.append)
    loop_seconds = states[-1]["epoch_seconds"][-1]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = students[1].to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [torch.rand(kd_batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=memory_format) for _ in range(2)]
    temperature = DISTILL.kd_temperature
    kd_step(teacher, student, optimizer, batches[0], temperature, amp)  # warm-up
    _, compute_seconds = timed(device, lambda: [
        kd_step(teacher, student, optimizer, batches[n % 2], temperature, amp) for n in range(8)])
    images = 8 * kd_batch
    loader, compute, loop = images / loader_seconds, images / compute_seconds, images / loop_seconds
    return {"loader_images_per_s": loader,
            "loader_images_per_s_per_worker": loader / max(num_workers, 1),
            "workers": num_workers, "compute_images_per_s": compute, "loop_images_per_s": loop,
            "loop_vs_compute": loop / compute, "loader_vs_compute": loader / compute}


def teacher_scores(stats, class_ids):
    """Mean final energy, p(y) and top-1 accuracy (%) of a set of sampled images."""
    class_ids = torch.as_tensor(class_ids, device=stats["top1"].device)
    return {"energy": stats["energy"].mean().item(), "p_class": stats["p_class"].mean().item(),
            "top1": 100.0 * (stats["top1"] == class_ids).float().mean().item()}


def check_guidance(pipe, teacher, prompts, class_ids, latents, *, guidance_vae=None,
                   class_names=None, progress=True, **sample_kwargs):
    """Measures on these weights whether energy guidance does what §2 says: the first thing to
    run with real weights on a new GPU. Returns {"fidelity", "modes", "per_class"} rows.

    fidelity: at the first, middle and last guided steps of the default trajectory, the cosine
    between the gradient of each other mode a user can pick (exact; approx with `guidance_vae`)
    and the method's g = ∇_{z_t} L(D(ẑ0), y) (approx, the pipeline's VAE at full size).
    modes: from the same initial noise, seconds per image and its ratio to unguided, then the
    mean final teacher energy, p(y) and top-1 accuracy. per_class: those three, unguided and
    with the default guidance, for each class.
    """
    options = {**SAMPLER, **sample_kwargs}
    modes = {"unguided": dict(energy_scale=0.0, class_scale=0.0), "approx (default)": {},
             "exact": dict(exact_grad=True)}
    if guidance_vae is not None:
        modes["approx, --guidance-vae decode"] = dict(guidance_vae=guidance_vae)
    rows = time_sampling_modes(pipe, teacher, prompts, class_ids, latents, modes,
                               progress=progress, **sample_kwargs)
    trace = []
    energy_guided_sample(pipe, teacher, prompts, class_ids, latents=latents, trace=trace,
                         **sample_kwargs)
    text, uncond = encode_prompts(pipe, prompts, options["cfg_scale"])
    objective = {key: options[key] for key in ("energy_scale", "class_scale", "temperature")}
    ids = torch.as_tensor(class_ids, device=pipe.device)
    fidelity = []
    early_middle_late = sorted({0, len(trace) // 2, len(trace) - 1}) if trace else []
    for entry in [trace[k] for k in early_middle_late]:
        alpha_bar, method_grad = entry["alpha_bar"], entry["grad"].flatten(1).double()
        predict = epsilon_predictor(pipe.unet, entry["timestep"], text, uncond,
                                    options["cfg_scale"], alpha_bar,
                                    pipe.scheduler.config.prediction_type)
        for mode in list(modes)[2:]:
            vae = modes[mode].get("guidance_vae", pipe.vae)
            _, grad = guidance_gradient(predict, vae, teacher, entry["noisy"], alpha_bar, ids,
                                        exact=mode == "exact", batch_size=options["guidance_batch"],
                                        **objective)
            cosine = F.cosine_similarity(grad.flatten(1).double(), method_grad)
            fidelity.append({"mode": mode, "step": entry["step"],
                             "cosine_mean": cosine.mean().item(),
                             "steps": len(pipe.scheduler.timesteps),
                             "cosine_min": cosine.min().item()})
    per_class = []
    for c in dict.fromkeys(class_ids):
        mine = [k for k, class_id in enumerate(class_ids) if class_id == c]
        scores = {row["mode"]: teacher_scores({key: v[mine] for key, v in row["stats"].items()},
                                              [c] * len(mine)) for row in rows[:2]}
        name = class_names[c] if class_names else str(c)
        per_class.append({"class": c, "name": name, "images": len(mine), **scores})
    for row in rows:
        row.update(teacher_scores(row.pop("stats"), class_ids))
    return {"fidelity": fidelity, "modes": rows, "per_class": per_class}


def check_guidance_table(result):
    """check_guidance's result as three Markdown tables: fidelity, modes, per class."""
    lines = ["| gradient mode | step | cosine with the method's g (mean) | (min) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['step']} of {r['steps']} | {r['cosine_mean']:.3f} | "
              f"{r['cosine_min']:.3f} |" for r in result["fidelity"]]
    lines += ["", "| sampling mode | s / image | × unguided | energy | p(y) | top-1 % |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['s_per_image']:.3f} | {r['vs_unguided']:.2f} | "
              f"{r['energy']:.3f} | {r['p_class']:.4f} | {r['top1']:.1f} |"
              for r in result["modes"]]
    lines += ["", "| class | images | energy: unguided → guided | p(y) | top-1 % |",
              "| --- | --- | --- | --- | --- |"]
    for r in result["per_class"]:
        before, after = r["unguided"], r["approx (default)"]
        lines.append(f"| {r['class']} {r['name']} | {r['images']} | {before['energy']:.3f} → "
                     f"{after['energy']:.3f} | {before['p_class']:.4f} → {after['p_class']:.4f} | "
                     f"{before['top1']:.0f} → {after['top1']:.0f} |")
    return "\n".join(lines)


def guided_cost_ratio(parts, num_steps, guided_steps):
    """Estimated cost of a guided image over an unguided one from the parts of a step, for
    N = num_steps steps of which G = guided_steps are guided."""
    unet, decode = parts["UNet step (CFG pair)"], parts["final decode"]
    guidance = parts["guidance gradient (decode + backward + teacher)"]
    # (N·unet + G·guidance + decode) / (N·unet + decode)
    return (num_steps * unet + guided_steps * guidance + decode) / (num_steps * unet + decode)


def benchmark_table(result, machine, *, num_steps=SAMPLING.steps, guided_steps=15):
    """The benchmark result as Markdown tables (the README keeps these); the guided/unguided cost
    is also extrapolated from the parts to `num_steps` steps of which `guided_steps` are guided."""
    lines = [f"Machine: {machine}", "", f"| sampling mode | s / image | × unguided | "
             f"{result['memory']} | final energy |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['s_per_image']:.3f} | {r['vs_unguided']:.2f} | "
              f"{r['peak_memory_gib']:.1f} | {r['mean_energy']:.3f} |" for r in result["sampling"]]
    lines += ["", "| part of a sampling step | s / image |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in result["parts"].items()]
    ratio = guided_cost_ratio(result["parts"], num_steps, guided_steps)
    lines += [f"| guided / unguided image at {num_steps} steps, {guided_steps} guided (from the "
              f"parts) | {ratio:.2f} |"]
    kd = result["distill"]
    lines += ["", "| distillation | images / s | / pure compute |", "| --- | --- | --- |",
              f"| loader alone ({kd['workers']} workers: read, decode, augment, collate) | "
              f"{kd['loader_images_per_s']:.1f} ({kd['loader_images_per_s_per_worker']:.1f} "
              f"per worker) | {kd['loader_vs_compute']:.2f} |",
              f"| pure compute (batches already on the device) | "
              f"{kd['compute_images_per_s']:.1f} | 1.00 |",
              f"| full KD loop (loader + copy + compute) | {kd['loop_images_per_s']:.1f} | "
              f"{kd['loop_vs_compute']:.2f} |"]
    return "\n".join(lines)


def run_benchmark(args, device):
    """--benchmark: runs benchmark() with the command line's sizes, prints its table and keeps it
    in OUT/benchmark.md and OUT/benchmark.json. Returns the result dict."""
    if rank_and_world()[1] > 1:
        raise UsageError("--benchmark times one process: run it without torchrun")
    out = Path(args.out)
    try:
        (out / "benchmark").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --out {out}: {first_line(error)}")
    height, width = args.height or 512, args.width or 512
    if height % 16 or width % 16:
        raise UsageError(f"--height and --width must be multiples of 16 for the benchmark, got "
                         f"{height}x{width}")
    result = benchmark(device, out / "benchmark", height=height, width=width, steps=args.steps,
                       gen_batch=args.gen_batch, kd_batch=args.batch_size,
                       image_size=args.image_size, num_workers=args.workers,
                       channels_last=args.channels_last, compile_unet=args.compile,
                       guidance_batch=args.guidance_batch, store_size=args.store_size,
                       image_format=args.image_format)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {os.cpu_count()} cores")
    settings = (f"{height}×{width}, {args.steps} steps, "
                f"{args.gen_batch} images per sampling batch, "
                f"{'fp16' if device.type == 'cuda' else 'fp32'}; "
                f"KD batch {args.batch_size} at {args.image_size} px, "
                f"{args.workers} workers, guidance batch {args.guidance_batch}, stored "
                f"{min(height, args.store_size or height)}² {args.image_format}"
                f"{', channels_last' if args.channels_last else ''}"
                f"{', torch.compile' if args.compile else ''}; torch {torch.__version__}")
    real = build_parser().parse_args([])  # the real run's defaults, for the extrapolated cost
    guided = guided_step_indices(real.steps, real.guidance_start, real.guidance_end,
                                 real.guidance_every)
    table = benchmark_table(result, f"{name} ({settings})", num_steps=real.steps,
                            guided_steps=len(guided))
    atomic_write(out / "benchmark.md", lambda temp: temp.write_text(table + "\n", encoding="utf-8"))
    write_json_atomic({"machine": name, "settings": settings, **result}, out / "benchmark.json")
    print(table)
    return result


def run_check_guidance(args, device):
    """--check-guidance: check_guidance() on the command line's models and sampling flags, for
    --check-classes classes spread evenly over the class list, --check-seeds images each (the
    built-in prompts, no LLM). Prints the tables and keeps them in OUT/check_guidance.md and
    .json. Returns the result dict."""
    if rank_and_world()[1] > 1:
        raise UsageError("--check-guidance measures one process: run it without torchrun")
    out, models = load_models(args, device)
    class_names, teacher = models.class_names, models.teacher
    count = min(args.check_classes, len(class_names))
    chosen = [round(k * (len(class_names) - 1) / max(count - 1, 1)) for k in range(count)]
    pipe, guidance_vae = load_sampler(args, device, out)
    prompts, _ = build_prompts(class_names, args.check_seeds, teacher=teacher, seed=args.seed,
                               descriptions=models.descriptions, photo_share=args.photo_share,
                               neighbours=args.neighbours,
                               text_encoder=(pipe.tokenizer, pipe.text_encoder))
    pairs = [(c, i) for c in chosen for i in range(args.check_seeds)]
    seeds = [image_seed(args.seed, c, i) for c, i in pairs]
    latents = initial_latents(seeds, latent_shape(pipe, args.height, args.width))
    result = check_guidance(pipe, teacher, [prompts[c][i] for c, i in pairs], [c for c, _ in pairs],
                            latents.to(device, pipe.unet.dtype), guidance_vae=guidance_vae,
                            class_names=class_names, guidance_batch=args.guidance_batch,
                            **sampling_options(args))
    table = check_guidance_table(result)
    atomic_write(out / "check_guidance.md", lambda temp: temp.write_text(table + "\n", "utf-8"))
    write_json_atomic(result, out / "check_guidance.json")
    print(table)
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, main() reports it
    exit_code = main()
    # the run is over: end as it did. SIG_IGN, not a Python handler: Python puts its own handlers
    # back to the default (killed by Ctrl-C) while it shuts down, but leaves SIG_IGN alone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(exit_code)
