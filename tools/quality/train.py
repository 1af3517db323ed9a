#!/usr/bin/env python3
"""Train the toy world's base model and concept LoRAs (CPU, minutes), reproducibly from a seed.

    python3 tools/host.py run -- tools/quality/train.py --seed 0 [--out tools/quality/models/seed-0]

The base model learns the four shapes in washed-out colours from prompts naming them; each concept
LoRA (rank 8 on the transformer blocks' linear layers and the convolutions) learns its trigger word
from images of the concept.
Both use v-prediction on ComfyUI's own noise schedule through ``BaseModel.apply_model``, so what is
trained is exactly what ComfyUI samples. Outputs: ``toy-base.safetensors`` and one ComfyUI-format
``toy-<concept>.safetensors`` per concept.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASE_STEPS = 1500
LORA_STEPS = 600
BATCH = 32
PROMPT_DROPOUT = 0.1
LORA_RANK = 8
LINEAR_TARGETS = re.compile(r"\.transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
CONV_TARGETS = re.compile(r"(\.(in_layers\.2|out_layers\.3)|^\.out\.2)$")
MODELS_DIR = Path(__file__).resolve().parent / "models"


class TrainableLoRA:
    """Rank-r factors on every transformer-block linear layer (LoRA) and every res-block and output
    convolution (LoCon, as kohya's ``conv_dim``), added by forward hooks while training."""

    def __init__(self, unet, rank: int, seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.factors: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.handles = []
        for name, layer in unet.named_modules():
            if LINEAR_TARGETS.search("." + name) and isinstance(layer, torch.nn.Linear):
                down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
                up = torch.zeros(layer.out_features, rank)
                hook = self.linear_hook
            elif CONV_TARGETS.search("." + name) and isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator) / fan_in**0.5
                up = torch.zeros(layer.out_channels, rank, 1, 1)
                hook = self.conv_hook
            else:
                continue
            pair = (torch.nn.Parameter(down), torch.nn.Parameter(up))
            self.factors[name] = pair
            self.handles.append(layer.register_forward_hook(lambda m, args, out, p=pair, h=hook: out + h(m, args[0], *p)))

    @staticmethod
    def linear_hook(_layer, x, down, up):
        return x @ down.T @ up.T

    @staticmethod
    def conv_hook(layer, x, down, up):
        from torch.nn.functional import conv2d

        return conv2d(conv2d(x, down, stride=layer.stride, padding=layer.padding), up)

    def parameters(self) -> list:
        return [p for pair in self.factors.values() for p in pair]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def state_dict(self) -> dict:
        """ComfyUI's own LoRA key format: ``diffusion_model.<layer>.lora_up/lora_down.weight`` (fp16, as
        LoRAs are usually shared) and ``.alpha``."""
        import torch

        tensors = {}
        for name, (down, up) in self.factors.items():
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora_down.weight"] = down.detach().to(torch.float16).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.detach().to(torch.float16).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(self.rank))
        return tensors


def batch_of(example, generator, batch: int):
    """Images as latents and token ids, with the prompt dropped (empty) for ``PROMPT_DROPOUT`` of them."""
    import torch

    from quality.world import as_latent, token_ids

    images, ids = [], []
    for _ in range(batch):
        image, words = example(generator)
        images.append(image)
        dropped = torch.rand((), generator=generator).item() < PROMPT_DROPOUT
        ids.append(token_ids([] if dropped else words))
    return as_latent(torch.stack(images)), torch.stack(ids)


def v_prediction_loss(model, embedding_table, latents, ids, generator):
    """MSE of ComfyUI's v-prediction output, written as a weighted loss on its denoised image."""
    import torch

    sigmas = model.model_sampling.sigmas
    sigma = sigmas[torch.randint(0, len(sigmas), (latents.shape[0],), generator=generator)]
    noise = torch.randn(latents.shape, generator=generator)
    noisy = latents + noise * sigma.view(-1, 1, 1, 1)
    denoised = model.apply_model(noisy, sigma, c_crossattn=embedding_table(ids))
    weight = ((sigma**2 + 1) / sigma**2).view(-1, 1, 1, 1)
    return (weight * (denoised - latents) ** 2).mean()


def train(steps: int, parameters: list, step_loss, learning_rate: float, label: str) -> float:
    import torch

    optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    started, recent = time.monotonic(), []
    for step in range(1, steps + 1):
        loss = step_loss()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        recent = [*recent, loss.item()][-50:]
        if step % 100 == 0 or step == steps:
            print(
                f"[train] {label} step {step}/{steps} loss {sum(recent) / len(recent):.4f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    return sum(recent) / len(recent)


def provenance(seed: int) -> dict[str, str]:
    """What a file's bits depend on besides the code: the seed, torch's version and its thread count
    (the order of floating-point sums changes with the threads, and training amplifies the difference)."""
    import torch

    return {"training_seed": str(seed), "torch_version": torch.__version__, "torch_threads": str(torch.get_num_threads())}


def main(argv: list[str] | None = None) -> int:
    from host_env import comfyui_on_path

    comfyui_on_path("quality/train.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: tools/quality/models/seed-<seed>")
    parser.add_argument("--base-steps", type=int, default=BASE_STEPS)
    parser.add_argument("--lora-steps", type=int, default=LORA_STEPS)
    parser.add_argument("--reuse-base", action="store_true", help="train only the LoRAs, on the base model already in --out")
    parser.add_argument("--concepts", help="comma-separated concept names to train (default: all)")
    options = parser.parse_args(argv)
    out = options.out or MODELS_DIR / f"seed-{options.seed}"

    import safetensors.torch
    import torch

    from quality import toy_model, world

    names = [c.name for c in world.ALL_CONCEPTS]
    wanted = [n.strip() for n in options.concepts.split(",")] if options.concepts else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        sys.exit(f"unknown concepts {unknown}; choose from {', '.join(names)}")
    if options.reuse_base and not (out / toy_model.BASE_FILE).is_file():
        sys.exit(
            f"--reuse-base: no {toy_model.BASE_FILE} in {out}; "
            "train the base first (leave out --reuse-base) or pass the base's folder as --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(options.seed)
    if not options.reuse_base:
        model, embedding = toy_model.new_model(options.seed)
        model.train()

        def base_step():
            latents, ids = batch_of(world.base_example, generator, BATCH)
            return v_prediction_loss(model, embedding, latents, ids, generator)

        train(options.base_steps, [*model.diffusion_model.parameters(), *embedding.parameters()], base_step, 2e-3, "base")
        toy_model.save_base(out / toy_model.BASE_FILE, model, embedding, provenance(options.seed))
        print(f"[train] wrote {out / toy_model.BASE_FILE}")

    # The LoRAs learn on the base as saved (half precision), the one they are used with, so a
    # --reuse-base run trains the same LoRAs as a run that trained the base first.
    patcher, table = toy_model.load_base(out / toy_model.BASE_FILE)
    model, embedding = patcher.model, torch.nn.Embedding.from_pretrained(table)
    model.requires_grad_(False)
    embedding.requires_grad_(False)
    for index, concept in enumerate(world.ALL_CONCEPTS):
        if concept.name not in wanted:
            continue
        generator.manual_seed(10_000 + options.seed * 100 + index)  # each LoRA's own data stream, so any subset reproduces
        lora = TrainableLoRA(model.diffusion_model, LORA_RANK, seed=options.seed * 100 + index)

        def lora_step(concept=concept):
            latents, ids = batch_of(lambda g: world.concept_example(concept, g), generator, BATCH)
            return v_prediction_loss(model, embedding, latents, ids, generator)

        train(options.lora_steps, lora.parameters(), lora_step, 5e-3, concept.name)
        lora.remove()
        target = out / toy_model.lora_file(concept)
        safetensors.torch.save_file(
            lora.state_dict(), str(target), metadata={"modelspec.trigger_phrase": concept.trigger, **provenance(options.seed)}
        )
        print(f"[train] wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
