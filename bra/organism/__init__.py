"""Model organisms of known refusal depth at a hooked layer L (issue 14): ``shallow`` (refusal trained above
L only; the layer-L residual is bitwise the base model's) and ``deep`` (RMU at and below L, then the same
refusal training above L). Built from a recipe by ``bra-organism build``; each is an ordinary Hugging Face
model folder with a ``provenance.json``."""

from bra.organism.build import OrganismResult, build_organisms
from bra.organism.config import DEEP, KINDS, SHALLOW, OrganismManifest, load_organism_manifest
from bra.organism.provenance import check_audit_prompts, is_organism, load_provenance

__all__ = ["DEEP", "KINDS", "SHALLOW", "OrganismManifest", "OrganismResult", "build_organisms",
           "check_audit_prompts", "is_organism", "load_organism_manifest", "load_provenance"]
