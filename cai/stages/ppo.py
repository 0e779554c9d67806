"""PPO with the preference model as reward, or direct RLAIF (DESIGN.md §1.6).

Not implemented yet: issue #6. The configuration (conf/ppo.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="ppo", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("ppo", issue=6)


if __name__ == "__main__":
    main()
