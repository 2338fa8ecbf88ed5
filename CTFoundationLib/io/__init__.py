"""Reading CTs and writing files: CTVolume, NIfTI/NRRD/DICOM readers, sanity warnings, batch cases, CSV tables,
atomic writes and hashing. No torch."""
