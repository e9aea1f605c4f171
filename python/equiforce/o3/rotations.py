"""Random rotation matrices (the one implementation used by training augmentation, the symmetry
audit, the examples and the tests)."""
import numpy as np


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation [3, 3] (det +1): QR of a Gaussian matrix, signs fixed."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent :func:`random_rotation` matrices [n, 3, 3]."""
    return np.stack([random_rotation(rng) for _ in range(n)]) if n else np.zeros((0, 3, 3))
