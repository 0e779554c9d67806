"""Labeler alignment: agreement of the AI labeler with human-labeled pairs, and its position bias.

Not implemented yet: issue #4. The configuration (conf/label_alignment.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="label_alignment", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("label_alignment", issue=4)


if __name__ == "__main__":
    main()
