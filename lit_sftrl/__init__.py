"""lit-sftrl: SFT and RL post-training of vision-language models on interactive environments.

Importing the package registers the environments with gymnasium and imports no torch.
"""

from lit_sftrl.envs import register_envs

register_envs()

__version__ = "0.1.0"
