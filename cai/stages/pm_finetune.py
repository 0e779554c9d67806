"""Preference-model fine-tuning on soft AI labels mixed with human comparisons (DESIGN.md §1.5).

Not implemented yet: issue #5. The configuration (conf/pm_finetune.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="pm_finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("pm_finetune", issue=5)


if __name__ == "__main__":
    main()
