"""Running on many processes and surviving their end: joining a pod, preemption, local multi-process."""
