"""SL-CAI data: red-team prompt -> answer -> principle-sampled critique -> revision (DESIGN.md §1.1).

Not implemented yet: issue #3. The configuration (conf/sl_generate.yaml) already composes.
"""

import hydra
from omegaconf import DictConfig

from cai.stages import CONFIG_PATH, not_implemented


@hydra.main(config_path=CONFIG_PATH, config_name="sl_generate", version_base=None)
def main(cfg: DictConfig) -> None:
    not_implemented("sl_generate", issue=3)


if __name__ == "__main__":
    main()
