"""BentoML services (policy, generator, classifier) and the runtime they share."""
