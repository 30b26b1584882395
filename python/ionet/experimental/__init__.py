"""Ray's `ray.experimental` names that ionet has: `tqdm_ray`."""
