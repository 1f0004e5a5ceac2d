// (in progress) A real browser: headless Chromium over WebDriver.
