"""What runs on the device: profiles, models, memory, subset plans, training and update encoding."""
