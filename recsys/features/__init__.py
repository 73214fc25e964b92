"""Features: the fitted feature contract and the rows -> KeyedJaggedTensor conversion."""
