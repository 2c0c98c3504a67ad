"""The quick and the full analysis as steps over the one streaming pass (`quick`, `full`)."""
