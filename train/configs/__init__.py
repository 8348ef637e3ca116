"""The shipped training configs (recipe YAMLs, the CPU demo's) and DeepSpeed JSONs, installed as ``f2llm.configs``:
``f2llm train --config f2llm-0.6b`` names one of them (see :func:`f2llm.config.find_config_file`)."""
