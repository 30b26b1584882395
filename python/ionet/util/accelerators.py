"""Ray's accelerator-type constants, as GPU model names nodes report (`--gpu-type`).

    @ionet.remote(num_gpus=1, accelerator_type=NVIDIA_A100)

A node declared or detected with `A100-80GB` or `A100-40GB` offers `A100` too, as Ray's
nodes do; the constants name the model family unless Ray names the memory size.
"""

NVIDIA_TESLA_V100 = "V100"
NVIDIA_TESLA_P100 = "P100"
NVIDIA_TESLA_T4 = "T4"
NVIDIA_TESLA_P4 = "P4"
NVIDIA_TESLA_K80 = "K80"
NVIDIA_TESLA_A10G = "A10G"
NVIDIA_L4 = "L4"
NVIDIA_L40S = "L40S"
NVIDIA_A100 = "A100"
NVIDIA_H100 = "H100"
NVIDIA_H200 = "H200"
NVIDIA_B200 = "B200"
NVIDIA_A100_40G = "A100-40GB"
NVIDIA_A100_80G = "A100-80GB"
NVIDIA_RTX_4090 = "RTX4090"
NVIDIA_RTX_3090 = "RTX3090"
AMD_INSTINCT_MI100 = "AMD-Instinct-MI100"
AMD_INSTINCT_MI250X = "AMD-Instinct-MI250X"
AMD_INSTINCT_MI300X = "AMD-Instinct-MI300X-OAM"
