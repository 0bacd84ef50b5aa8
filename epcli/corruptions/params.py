"""The corruption names and the CIFAR-10-C parameters of make_cifar_c.py, one entry per severity 1..5.

`CORRUPTIONS` is the 15 benchmark corruptions in the reference's order followed by the 4 extra ones; `PARAMS` maps
each name to its five severities' parameters (docs/corruptions.md names the fields). Every corruption function
reads its severity's row here, so this table is the one place the severities are defined.
"""

from __future__ import annotations

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS

_S = 32  # the reference's image size (CIFAR); size-dependent parameters below are for 32 x 32

# CIFAR-10-C parameters per severity 1..5 (make_cifar_c.py). Tuples name their fields in docs/corruptions.md.
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                     # std
    "shot_noise": (500, 250, 100, 75, 50),                                # Poisson photons per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                      # salt-and-pepper amount
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),                      # multiplicative std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),                           # sigma
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),        # radius, alias sigma
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),                        # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),                          # arange(1, stop, 0.01)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),       # fog weight, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                            # added to V (HSV)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                              # scale about the channel mean
    "elastic_transform": tuple((_S * a, _S * s, _S * j) for a, s, j in
                               ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03))),                      # alpha, sigma, affine jitter (px)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                            # downscale factor (PIL BOX)
    "jpeg_compression": (80, 65, 58, 50, 40),                             # PIL quality
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    # loc, scale, sigma, threshold, intensity (water) / mud sigma, mode (0 water, 1 mud)
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),     # S * a + b (HSV)
}
