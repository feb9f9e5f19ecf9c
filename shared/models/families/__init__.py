"""One adapter per architecture family: where its layers live and how a step runs them."""
