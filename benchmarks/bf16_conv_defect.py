"""Reproduces oneDNN's bf16 convolution defect that `train.precision=auto` steps around on CPUs.

    .venv/bin/python benchmarks/bf16_conv_defect.py

A 3x3 stride-2 convolution whose input map is 1x1, under CPU bf16 autocast, returns weight gradients of
1e20-1e37 (or inf) for many batch and channel counts, where fp32 gives values of about 10; the values
change from run to run (uninitialised memory). Maps of 2x2 and larger are right. Seen with torch 2.14.1
on an AVX512-BF16/AMX CPU; soco's `auto` therefore uses bf16 on the CPU only for views of at least
`soco.engine.step.AUTO_BF16_MIN_SIDE` pixels.
"""

import torch


def main() -> None:
    """Print every (batch, channels, map side, stride) whose bf16 weight gradient is off by more than 5%."""
    torch.manual_seed(0)
    wrong = 0
    for batch in (2, 4, 8, 16):
        for channels in (64, 128, 256, 512):
            for side in (1, 2, 3, 7):
                for stride in (1, 2):
                    conv = torch.nn.Conv2d(channels, 2 * channels, 3, stride, 1, bias=False)
                    inputs = torch.randn(batch, channels, side, side)
                    conv(inputs).sum().backward()
                    exact = conv.weight.grad.clone()
                    conv.weight.grad = None
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        output = conv(inputs)
                    output.float().sum().backward()
                    error = float((conv.weight.grad - exact).abs().max() / exact.abs().max())
                    if not error <= 0.05:
                        wrong += 1
                        print(f"batch {batch}, channels {channels}, map {side}x{side}, stride {stride}: "
                              f"relative error {error:.3g}")
    print(f"{wrong} of 128 shapes wrong")


if __name__ == "__main__":
    main()
