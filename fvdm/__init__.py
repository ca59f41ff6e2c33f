"""fvdm: train fast vecset diffusion models (FlashVDM) from pretrained Hunyuan3D-2 checkpoints."""
__version__ = "0.1.0"
