"""SL-CAI training: supervised fine-tuning on the final revisions under DeepSpeed (DESIGN.md §1.2).

Not implemented yet: issue #3. The configuration (conf/sl_train.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="sl_train", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("sl_train", issue=3)


if __name__ == "__main__":
    main()
