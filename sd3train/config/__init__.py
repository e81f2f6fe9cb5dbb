"""Typed config: schemas (the one source of defaults), composition from conf/, validation.

Importing the package registers the schema's defaults in Hydra's ConfigStore, where conf/config.yaml
starts (sd3train/config/compose.py): whatever composes conf/ imports this package to validate.
"""

from sd3train.config.compose import register_schema_defaults

register_schema_defaults()
