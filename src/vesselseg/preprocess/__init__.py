"""Image preprocessing for the prepare stage: OCTA projection, channel choice, equalization."""
