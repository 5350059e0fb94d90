"""Shape letters used across memx (jaxtyping signatures, einsum strings, tensor suffixes).

B batch · T query tokens · S key tokens · H heads (query) · G kv groups / kv heads · K key/state dim
V value dim · D model dim · F MLP dim · N SSM state dim · C chunk length · L layers
"""

from jaxtyping import Array, Bool, Float, Int

__all__ = ["Array", "Bool", "Float", "Int"]
