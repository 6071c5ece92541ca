"""The Recipe: schema (sections, fields and their facts), loading (YAML, overrides) and checking.

Knows nothing about torch. `from usi import recipe; recipe.load(path, overrides)` is the usual entry.
"""
from usi.recipe.loading import (
    from_dict,
    from_tree,
    load,
    member_section,
    parse_override,
    parse_yaml,
    read_yaml,
    recipe_path,
    set_dotted,
)
from usi.recipe.schema import (
    MEMBER_KEYS,
    SECTIONS,
    AugSection,
    DataSection,
    EmaSection,
    FeaturesSection,
    LossSection,
    ModelSection,
    OptimSection,
    Recipe,
    RunSection,
    SchedSection,
    TeacherSection,
    describe,
    fields_of,
    mixes,
    resume_free_keys,
)

__all__ = ["AugSection", "DataSection", "EmaSection", "FeaturesSection", "LossSection", "MEMBER_KEYS", "ModelSection",
           "OptimSection", "Recipe", "RunSection", "SECTIONS", "SchedSection", "TeacherSection", "describe",
           "fields_of", "from_dict", "from_tree", "load", "member_section", "mixes", "parse_override", "parse_yaml",
           "read_yaml", "recipe_path", "resume_free_keys", "set_dotted"]
