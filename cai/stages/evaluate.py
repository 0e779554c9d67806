"""Evaluation: PM score, AI-judge win rates, harmlessness and Elo across checkpoints (DESIGN.md §1.7).

Not implemented yet: issue #7. The configuration (conf/evaluate.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("evaluate", issue=7)


if __name__ == "__main__":
    main()
