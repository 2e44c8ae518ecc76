-- Argo CD health check for loader.azaion.com/ImageUnlock (kstatus-style status).
--   Healthy      Ready=True and status.observedGeneration == metadata.generation
--   Degraded     Stalled=True for the current generation: a user error (Secret, archive,
--                spec) that the operator does not retry until something changes
--   Progressing  anything else: no status yet, the operator has not caught up with the
--                latest spec, or an unlock is under way or being retried
-- Install: argocd-cm key resource.customizations.health.loader.azaion.com_ImageUnlock
-- (gitops/argocd-cm.yaml carries this exact text).
local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function detail(c, fallback)
  local text = fallback
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    text = c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason .. ": " .. (text or "")
  end
  return text or ""
end

local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the ImageUnlock operator to report status"

local status = obj.status
if status == nil then
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
local current = generation == nil or (observed ~= nil and observed == generation)
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")

if current and stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = detail(stalled, status.message)
  return hs
end

if current and ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = (ready.message ~= nil and ready.message ~= "") and ready.message or (status.message or "Ready")
  return hs
end

-- Progressing: say what is going on.
local working = reconciling ~= nil and reconciling.status == "True"
  and (generation == nil or reconciling.observedGeneration == nil or reconciling.observedGeneration == generation)
if working then
  local text = status.phase or "Reconciling"
  if status.progress ~= nil and status.progress.text ~= nil and status.progress.text ~= "" then
    text = text .. " " .. status.progress.text
  end
  if status.message ~= nil and status.message ~= "" then
    text = text .. ": " .. status.message
  end
  hs.message = text
elseif not current then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  if observed ~= nil then
    hs.message = hs.message .. " (status is for generation " .. tostring(observed) .. ")"
  end
elseif status.message ~= nil and status.message ~= "" then
  hs.message = status.message
end
return hs
