"""The DIMM-PIM device: bank PUs in every DRAM bank, a rank PU on every DIMM buffer chip."""
