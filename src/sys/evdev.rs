//! evdev ioctls for the button (EVIOCGKEY, EVIOCGRAB, EVIOCGBIT, EVIOCGNAME).
