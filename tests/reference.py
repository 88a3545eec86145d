"""The float64 reference of the contract the tests compare every backend with: it lives in the
package (gradstab/reference.py) so that ``python -m gradstab check`` uses the same one."""

from gradstab.reference import ReferenceStabilizer, RefState

__all__ = ["RefState", "ReferenceStabilizer"]
