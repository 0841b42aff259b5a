"""The earlier version of the MURA paper: the same recipe at 224x224."""

from murajax.configs import default


def get_config():
    config = default.get_config()
    config.data.image_size = 224
    return config
